"""peerd.p2p against a second libp2p implementation: js-libp2p (tests/interop/js/peer.mjs).

protocol/SPEC.md §2.1 names the stack a compatible peer speaks (TCP, Noise, yamux,
gossipsub with strict signing, Kademlia on /ipfs/kad/1.0.0). These tests check that an
independent implementation really does interoperate with peerd's P2PNode, and that
P2PNode survives two hostile behaviours found with such a peer (issue 11):

* a DHT client that looks peers up and leaves: its records outlive it, their addresses
  lapse in the peer store, and discovery then met py-libp2p's ``PeerStoreError`` outside
  any guard, which ended every node's p2p task within minutes;
* a peer that opens many /meshsub/1.1.0 and /ipfs/kad/1.0.0 streams and never writes:
  each held stream pinned buffers, without a per-peer cap or an idle timeout.

The js peer is installed by ``scripts/test`` (``ensure_interop_js``); without it these
tests fail and say how to install it. Every wait is bounded; nothing asserts on durations.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from conftest import eventually as eventually_async
from test_p2p import TOPIC, Recorder, eventually, full_mesh, gossip_ready, make_node, running

from peerd.p2p import P2PNode
from protocol.errors import TransportError
from tests.interop.jspeer import JsPeer, js_peer, require_interop_js

pytestmark = pytest.mark.slow

MESHSUB = "/meshsub/1.1.0"
KAD = "/ipfs/kad/1.0.0"


@pytest.fixture(autouse=True)
def _interop_js_installed() -> None:
    require_interop_js()  # fails (never skips) before any node starts, saying how to install


async def js_gossip_ready(js: JsPeer, recorder: Recorder, tag: str) -> None:
    """js publishes probes until ``recorder`` saw one (the mesh forms on heartbeats)."""
    for i in range(100):
        probe = f"js-probe-{tag}-{i}"
        reply = await js.request("publish", topic=TOPIC, data=probe)  # "no peers" until subscribed
        with trio.move_on_after(0.3 if reply["event"] == "done" else 0.1):
            while probe.encode() not in recorder.payloads():
                await trio.sleep(0.02)
        if probe.encode() in recorder.payloads():
            return
        await trio.sleep(0.2)
    raise AssertionError("js -> py gossip never got through")


async def py_gossip_ready(node: P2PNode, js: JsPeer, tag: str) -> None:
    """``node`` publishes probes until the js peer received one."""
    for i in range(100):
        probe = f"py-probe-{tag}-{i}"
        await node.publish(TOPIC, probe.encode())
        with trio.move_on_after(0.3):
            while probe not in js.payloads(TOPIC):
                await trio.sleep(0.02)
        if probe in js.payloads(TOPIC):
            return
    raise AssertionError("py -> js gossip never got through")


# --- a. interop ------------------------------------------------------------------------------


async def test_js_libp2p_peer_interoperates_with_p2pnode() -> None:
    at_py = Recorder()
    node = make_node(at_py)
    async with running(node), js_peer() as js:
        await js.call("subscribe", topic=TOPIC)
        dialled = await js.call("dial", addr=node.listen_addrs()[0])
        # Noise authenticated the key behind the /p2p/ id, over the only stack peerd offers.
        assert dialled["peer"] == node.peer_id
        assert dialled["encryption"] == "/noise"
        assert dialled["multiplexer"] == "/yamux/1.0.0"
        await eventually(lambda: js.peer_id in node.connected_peers(), "P2PNode sees the js peer")

        identified = await js.call("identify", peer=node.peer_id)
        assert identified["peer"] == node.peer_id
        assert identified["has_public_key"]
        assert {"/ipfs/id/1.0.0", "/ipfs/ping/1.0.0", KAD, MESHSUB} <= set(identified["protocols"])
        assert node.listen_addrs()[0].split("/p2p/")[0] in identified["listen_addrs"]
        await js.call("ping", peer=node.peer_id)  # an error reply raises

        # Kademlia: the js client's lookup is answered by the P2PNode.
        found = await js.call("lookup", key=node.peer_id)
        assert node.peer_id in found["responded"]
        assert node.peer_id in found["peers"]

        # Gossip both ways under strict signing: each side verified the other's signature
        # against the originator's key (js: StrictSign; py: strict_signing=True).
        await py_gossip_ready(node, js, "a")
        await node.publish(TOPIC, b"hello from py")
        await eventually(lambda: "hello from py" in js.payloads(TOPIC), "py message at js")
        [got] = [m for m in js.messages(TOPIC) if m["data"] == "hello from py"]
        assert got["type"] == "signed"
        assert got["from"] == node.peer_id

        await js_gossip_ready(js, at_py, "a")
        await js.call("publish", topic=TOPIC, data="hello from js")
        await eventually(lambda: b"hello from js" in at_py.payloads(), "js message at the validator")
        [seen] = [m for m in at_py.seen if m.data == b"hello from js"]
        assert seen.origin == js.peer_id
        assert seen.received_from == js.peer_id
        assert seen.topic == TOPIC
        assert node.stats()["validator_errors"] == 0


# --- b. a peer that leaves -------------------------------------------------------------------


@asynccontextmanager
async def supervised(*nodes: P2PNode) -> AsyncIterator[dict[str, BaseException | None]]:
    """Run nodes like ``running``, but record how a node's run() ended instead of letting it
    cancel the others: the test then reports WHICH node died and why.

    The dict maps peer ID -> the exception run() raised (None if it returned); a node still
    running is absent.
    """
    ended: dict[str, BaseException | None] = {}

    async def watch(node: P2PNode, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await node.run(task_status=task_status)
        except Exception as exc:
            ended[node.peer_id] = exc
        else:
            ended[node.peer_id] = None

    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(watch, node)
        yield ended
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("dht_server", [False, True], ids=["js-dht-clients", "js-dht-servers"])
async def test_dht_peers_that_leave_do_not_end_any_node(dht_server: bool) -> None:
    # Clients as reported; servers too, which a correct routing table does admit and so
    # hands out after they left. A short address lifetime so that the departed peers'
    # peer-store entries lapse within the test, as libp2p's 120 s ones did within minutes
    # on the devnet.
    ttl = 2.0
    recorders = [Recorder() for _ in range(3)]
    boot = make_node(recorders[0], peer_addr_ttl_s=ttl)
    async with supervised(boot) as ended_boot:
        boot_addr = boot.listen_addrs()[0]
        others = [make_node(r, bootstrap=(boot_addr,), peer_addr_ttl_s=ttl) for r in recorders[1:]]
        async with supervised(*others) as ended:
            nodes = [boot, *others]
            await full_mesh(nodes)
            ids = {n.peer_id for n in nodes}
            addrs = [n.listen_addrs()[0] for n in nodes]

            def assert_all_alive(when: str) -> None:
                ended_all = {**ended_boot, **ended}
                dead = {peer: f"{exc!r} from {exc.__cause__!r}" for peer, exc in ended_all.items()}
                assert not dead, f"run() ended ({when}): {dead}"

            # Two js DHT peers (listening, as the reported one was) join through the
            # bootstrap node, look the network up, and leave; the second one comes after
            # the first one's addresses have lapsed.
            for round_ in range(2):
                async with js_peer(listen=True, dht_server=dht_server) as js:
                    await js.call("dial", addr=boot_addr)
                    found = await js.call("lookup")
                    await js.call("lookup", key=others[round_].peer_id)
                assert_all_alive(f"after js peer {round_}")
                # Kademlia interop across the network: the js peer learned every
                # P2PNode from the bootstrap node alone (and the DHT still answers after
                # a js peer left).
                assert ids <= set(found["peers"]), (round_, found)
                await eventually(
                    lambda: all(len(n.connected_peers()) == 2 for n in nodes), "the js peer gone"
                )
                await trio.sleep(ttl + 1.5)  # let its addresses lapse: the lapse itself takes time

            # Past the address lifetime, discovery runs again on every node; each connect()
            # kicks a lookup, which meets the departed peers' records (in routing tables
            # and in the answers of the other nodes).
            lookups_before = [n.stats()["discovery_lookups"] for n in nodes]

            def lookups_done() -> bool:
                now = [n.stats()["discovery_lookups"] for n in nodes]
                return all(a >= b + 3 for a, b in zip(now, lookups_before, strict=True))

            for _ in range(240):
                if ended or ended_boot or lookups_done():
                    break
                for i, node in enumerate(nodes):
                    with contextlib.suppress(TransportError):  # a dead node is reported below
                        await node.connect(addrs[(i + 1) % 3])
                await trio.sleep(0.5)
            assert_all_alive("after discovery past the address lifetime")
            assert lookups_done(), "discovery did not run three times on every node"

            # Every node still gossips with the others.
            for i, node in enumerate(nodes):
                await gossip_ready(node, [r for j, r in enumerate(recorders) if j != i])
            assert_all_alive("at the end")


# --- c. stalled libp2p streams ---------------------------------------------------------------

#: Streams of one protocol the attacker opens from ONE identity; the reported attack held
#: 250 per identity. A per-peer cap of a few streams must refuse most of them.
STALLED_PER_PROTOCOL = 64
#: The most stalled streams of one protocol family one peer may keep open. libp2p itself
#: needs one long-lived gossipsub stream per peer (two while a reconnect overlaps) and a
#: few concurrent Kademlia requests; anything near STALLED_PER_PROTOCOL is unbounded.
HELD_BOUND = 8


def py_streams_from(node: P2PNode, peer_id: str) -> int | None:
    """Streams open on ``node``'s libp2p connection(s) to ``peer_id``, both directions.

    Reaches into libp2p's swarm and yamux objects (there is no public gauge for one peer);
    None if that structure is not there.
    """
    host = node._host
    if host is None:
        return None
    try:
        connections = host.get_network().connections
        return sum(
            len(conn.muxed_conn.streams)
            for peer, conns in connections.items()
            if peer.to_base58() == peer_id
            for conn in (conns if isinstance(conns, list) else [conns])
        )
    except AttributeError:
        return None


async def test_stalled_meshsub_and_kad_streams_are_capped_and_timed_out() -> None:
    at_victim, at_other = Recorder(), Recorder()
    victim, other = make_node(at_victim), make_node(at_other)
    async with running(victim, other):
        await other.connect(victim.listen_addrs()[0])
        # The attacker serves neither protocol itself (js-libp2p would then cap its own
        # outbound streams), so every stream it opens is a bare, stalled one.
        async with js_peer(services=("identify", "ping")) as js:
            await js.call("dial", addr=victim.listen_addrs()[0])
            for protocol in (MESHSUB, KAD):
                await js.call(
                    "stall", peer=victim.peer_id, protocol=protocol, count=STALLED_PER_PROTOCOL, timeout=300
                )

            async def report() -> dict[str, Any]:
                return (await js.call("streams"))["stalled"]

            def still_open(stalled: dict[str, Any], protocol: str) -> int:
                return int(stalled.get(protocol, {}).get("open", 0))

            # Per-peer cap: all but a few of each protocol are refused (reset) by the victim.
            async def capped() -> bool:
                stalled = await report()
                return all(still_open(stalled, p) <= HELD_BOUND for p in (MESHSUB, KAD))

            await eventually_async(capped, "the victim refused the streams over its per-peer cap", timeout=60)
            assert victim.stats()["streams_capped"] >= 2 * (STALLED_PER_PROTOCOL - HELD_BOUND)
            assert victim.peer_id in await js_peers(js)  # refused streams, not a dropped peer

            # Idle timeout: the Kademlia streams the cap admitted are closed too, since a
            # request that never comes is not a request. (Gossipsub's one stream per peer
            # is long-lived by design: a quiet topic is not an idle peer.)
            async def kad_closed() -> bool:
                return still_open(await report(), KAD) == 0

            await eventually_async(kad_closed, "the admitted stalled kad streams closed", timeout=120)
            assert victim.stats()["streams_idle_closed"] >= 1

            # What the victim's side of the connection holds stays bounded too.
            held = py_streams_from(victim, js.peer_id)
            assert held is not None, "libp2p's connection structure changed; update py_streams_from"
            assert held <= 2 * HELD_BOUND, held
            stalled = await report()
            assert still_open(stalled, MESHSUB) <= HELD_BOUND

        # The victim still serves honest peers: gossip both ways with the other node.
        await gossip_ready(victim, [at_other])
        await gossip_ready(other, [at_victim])


async def js_peers(js: JsPeer) -> list[str]:
    return list((await js.call("peers"))["peers"])
