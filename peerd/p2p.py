"""The daemon's only window onto libp2p (py-libp2p 0.8.1): host, gossip, streams, discovery.

docs/design.md §2.3 makes this the ONLY module that imports libp2p, so every finding in
docs/design.md appendix B.1 ("trap N" below) is handled here, once, and the rest of the
daemon sees a small surface: :class:`P2PNode` (run / connect / publish with validators /
framed streams / stats) and the error types of :mod:`protocol.errors`.

Which trap each piece handles:

* trap 1  (TLS/SECIO/plaintext offered by default) — :meth:`P2PNode._build_host` passes a
  Noise-only ``sec_opt``; Yamux is the only muxer.
* trap 2  (fixed 250 ms happy-eyeballs wait per dial) — ``max_connections_per_peer=1``.
* trap 3  (120 s heartbeat, adaptive gossip drifting to 30-60 s) — 1 s heartbeat
  (``P2PConfig.heartbeat_s``), ``adaptive_gossip_enabled=False``.
* trap 4  (10 msg/s per topic per *neighbour*, also applied to our own publishes) — libp2p's
  spam protection is off; :class:`_TokenBucket` limits per (topic, *origin*) instead.
* trap 5  (pubsub stream arriving before pubsub runs kills the process) — pubsub and gossipsub
  run before the host listens, and bootstrap peers are dialled by us, never via ``new_host``.
* trap 6  (32-slot subscription queues, 1 MiB RPC cap) — every subscription queue is drained by
  :meth:`P2PNode._drain`; the overflow warning is filtered; gossip payloads are capped below
  libp2p's RPC limit (:data:`_LIBP2P_MAX_GOSSIP`).
* trap 7  (a raising stream handler tears the host down) — :meth:`P2PNode._serve_stream`.
* trap 8  (listener keeps accepting after ``host.run`` exits) — :meth:`P2PNode.run` closes the
  host explicitly, shielded, on every exit path.
* trap 9/10 (request_response > 6.5 MB fails; yamux resets a stalled reader after 5 s) — streams
  are raw libp2p streams with our own 4-byte framing (:mod:`protocol.framing`);
  callers chunk and acknowledge (blob protocol).
* trap 11 (rcmgr admits N-1 connections and silently drops the N-th) — an explicit resource
  manager with limits far above a devnet, and :meth:`P2PNode._dial` checks that the
  connection really exists after ``connect`` returns.
* trap 12/13 (scoring inert; 120 s seen-cache allows replay) — not relied on: adverts and all
  other signed messages carry their own sequence and expiry (docs/design.md §3.3).
* trap 14 (noisy DHT logger) — ``libp2p.kad_dht`` is lowered to ERROR.
Found while building this (appendix B.1 lists them too; measured on this machine):

* trap 15: the swarm keeps a 60 s "negative cache" of peers whose dial failed and refuses to
  redial them, which would defeat a 0.5 s bootstrap backoff; our own dials evict the entry
  first. The swarm's own retry loop is disabled: :meth:`P2PNode._keep_connected` owns backoff.
* trap 16: gossipsub v1.2's IDONTWANT makes every receiver send a control RPC to every mesh
  peer per message (each RPC carries a signed peer record the receiver verifies twice); in a
  small full mesh it always arrives too late to save a duplicate. Only v1.1 is offered
  (4-node in-process p50 publish-to-all 20.6 ms -> 5.3 ms).
* trap 17: py-libp2p's yamux credits the send window after every read, and pubsub/DHT read
  varints byte by byte (pubsub's reads: trap 28): 3.2 WINDOW_UPDATE frames per 1.1 data
  frames for a one-hop gossip message. :func:`_credit_at_half_window` credits once half the
  window is consumed, as go-yamux does, with the window at 16 MiB from the first credit on
  (an idle daemon sent one update per data frame it received before).
* trap 18: a payload between ~1 MiB - 16 KiB and 1 MiB passes ``publish`` and is then
  silently dropped by libp2p's outbound RPC queue; we refuse it (LocalProtocolError).
* trap 19: a DHT lookup costs ~15 ms of CPU per neighbour here; lookups are rare once joined
  (see ``_DISCOVERY_*``).
* trap 20: py-libp2p 0.8.1 attaches our signed peer record (``senderRecord``) to every pubsub
  RPC it sends, rebuilding our address list for it each time, and on every RPC it receives
  re-parses and re-verifies the sender's record, twice when the RPC carries control
  messages, then rewrites that peer's addresses in the peer store. Neither can be turned
  off. :func:`_install_sender_record_caches` makes a host verify each (peer, record) once
  and re-use its own record for a few seconds (issue 10: an idle daemon near zero).
* trap 22: a neighbour's outbound gossip queue holds 32 RPCs and drops the rest silently;
  raised to :data:`_OUTBOUND_QUEUE` (:func:`_configure_libp2p_process`).
* trap 23: py-libp2p 0.8.1's gossipsub sends a message we publish to our mesh peers only and has
  no flood-publish option (go-libp2p and js-libp2p flood by default), so one-hop delivery
  needed a full mesh, and each mesh neighbour forwards a copy of every message to every
  other: :func:`_install_flood_publish` adds it, and the mesh is kept at 2-3 (issue 10).
* trap 24: a new stream's protocol negotiation costs two round trips: the client waits for
  the multistream header's echo before it names the protocol.
  :class:`_PipelinedMultiselectClient` sends both lines at once (one round trip), as
  go-multistream does.
* trap 25: yamux pings every connection from both ends every 30 s, only to measure the round
  trip: every :data:`_YAMUX_PING_S` instead (:func:`_configure_libp2p_process`).
* trap 26: gossip offers each message id on every heartbeat of its 3-heartbeat window:
  :func:`_install_sparse_ihave` offers it once.
* trap 27: pubsub spawns each message's push through its task manager (a scan of every task,
  and one raising push cancels pubsub and the node): :func:`_install_direct_push`.
* trap 28: pubsub reads an RPC's length byte by byte, a yamux read per byte:
  :func:`_install_buffered_rpc_reads` reads each RPC in one buffered read.
* trap 29: ``BasicHost.get_addrs`` cuts a circuit address at the relay's ``/p2p/`` to append
  our ID, announcing the relay's own address as ours: :meth:`P2PNode._install_circuit_addrs`.
* trap 30: nothing in ``new_host()`` uses circuit relay v2, and the swarm dials only TCP:
  :meth:`P2PNode._install_circuit_relay` registers the hop (``relay_service``) and stop
  (``relays``) handlers behind the inbound guard, :meth:`P2PNode._dial` dials circuit
  addresses through the circuit transport, :meth:`P2PNode._keep_reserved` keeps our
  reservations (docs/design.md §10.7).
* libp2p validates a message again when a duplicate arrives while the first copy is still
  being validated (it marks messages seen only afterwards): validators therefore go through
  our own verdict cache, so each unique message reaches a validator exactly once.

Hostile and departing peers (issue 11), each handled here:

* a departed peer's lapsed peer-store entry (py-libp2p raises PeerStoreError) never reaches
  the p2p task: :meth:`P2PNode._known_addrs`; a discovery round that fails in any way is
  counted and the loop goes on; a discovered peer that does not answer leaves the routing
  table (:meth:`P2PNode._forget`);
* only peers that identify as Kademlia servers enter the routing table, the DHT's own
  inbound path included (:meth:`P2PNode._only_dht_servers`);
* every inbound stream, libp2p's own protocols included, has a per-(peer, protocol) cap
  and a read idle timeout (:class:`_InboundGuard`, :data:`_STREAM_POLICIES`);
* handshakes in progress are capped per source address (:class:`_HandshakeGate`);
* gossip a neighbour relays for other origins has its own token bucket, so free identities
  behind one connection are slowed as one.

Validators run after libp2p has checked the strict signature against the message's
``from``, so :attr:`GossipMessage.origin` is the verified originator; they never see our
own messages. Error handling: every libp2p exception becomes a
:class:`protocol.errors.TransportError` in :func:`_translate_errors`; misuse by our callers
(bad addresses, oversized publishes, registering after start) is a LocalProtocolError.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import logging
import math
import random
import secrets
import time
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.connection_types import ConnectionType
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import ParseError
from libp2p.host.exceptions import StreamFailure
from libp2p.host.ping import ID as _PING_PROTOCOL
from libp2p.host.ping import PING_LENGTH as _PING_BYTES
from libp2p.io.exceptions import IncompleteReadError, IOException, MessageTooLarge
from libp2p.io.utils import read_exactly
from libp2p.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.network.exceptions import SwarmException
from libp2p.network.stream.exceptions import StreamClosed, StreamEOF, StreamReset
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.protocol_muxer.exceptions import MultiselectClientError, MultiselectCommunicatorError
from libp2p.protocol_muxer.multiselect_client import (
    DEFAULT_NEGOTIATE_TIMEOUT,
    MULTISELECT_PROTOCOL_ID,
    PROTOCOL_NOT_FOUND_MSG,
    MultiselectClient,
    is_valid_handshake,
)
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.rpc_queue import DefaultMaxMessageSize, RpcQueue
from libp2p.rcmgr import ResourceManager
from libp2p.rcmgr.manager import ResourceLimits
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as _HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID as _STOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux import yamux as _yamux_module
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils import encode_delim
from libp2p.utils.address_validation import expand_wildcard_address

from peerd.streams import FrameStream
from protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError, TransportError
from protocol.framing import MAX_FRAME, FrameDecoder, encode_frame

if TYPE_CHECKING:
    # libp2p pulls in trio-typing, whose stale trio stubs shadow trio's own annotations for
    # mypy and lack trio.TaskStatus; the protocol lives in trio_typing there.
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

# --- tunables that are not user configuration -------------------------------------------

#: libp2p caps a whole pubsub RPC at 1 MiB in both directions (``rpc_queue.DefaultMaxMessageSize``,
#: not configurable for the outbound queue) and silently drops bigger ones (trap 6). The RPC
#: also carries topic, sender, seqno, signature, key and a signed peer record, so a payload
#: must leave headroom; 16 KiB is far more than those fields take.
_LIBP2P_MAX_GOSSIP = (1 << 20) - (16 << 10)
#: Gossipsub mesh degree, sized to the network (:func:`_mesh_degrees`, issue 10). Our own
#: messages are flood-published to every subscribed neighbour (:func:`_install_flood_publish`),
#: so the mesh is not what makes gossip one hop: it forwards to peers that are not the origin's
#: neighbours and backs up a lost direct send. Each mesh neighbour sends us a copy of every
#: message it receives, so an idle node's cost is about (adverts/s in the network) x (1 + 2D)
#: RPCs, plus one IHAVE every _GOSSIP_WINDOW heartbeats (trap 26) to _GOSSIP_LAZY peers outside
#: the mesh (py-libp2p's own figure is at least 6 on every heartbeat, trap 21). Measured with
#: `scripts/bench --quick adverts` at 10 and 20 daemons (docs/benchmarks.md, 2026-12-04): a full
#: mesh of 9 cost 0.50 % of a core per idle daemon at 10 with publish-to-all p50 64 ms; D = 3
#: with flood publishing 0.34 % and 32 ms; D = 2 0.34 % and 22 ms at 10, and 0.73 % against
#: 0.89 % (D = 3) at 20. A mesh of 2-3 is still connected with high probability, and the origin's
#: flood reaches every neighbour.
_FULL_MESH_PEERS = 3
_MESH_D, _MESH_D_LOW, _MESH_D_HIGH = 2, 2, 3
_GOSSIP_LAZY = 1
#: py-libp2p's gossip window: a message id is in the IHAVEs of this many heartbeats (trap 26).
_GOSSIP_WINDOW = 3
#: RPCs queued per neighbour before libp2p drops one (trap 22; its default is 32).
_OUTBOUND_QUEUE = 128
#: How often flush() looks at libp2p's outbound gossip queues.
_FLUSH_POLL_S = 0.02
#: trap 25: py-libp2p's yamux pings every connection from both ends every 30 s (0.5 s after it
#: opens, then RTT_MEASURE_INTERVAL), only to measure the round trip; nothing acts on a lost
#: pong. With a connection to every peer that is 4 frames per peer per 30 s: on an idle
#: 20-daemon devnet 80-84 a minute against 139-174 data frames (docs/benchmarks.md, 2026-12-05).
#: Our own probes (_RTT_PROBE_AT_S) measure a new connection; later samples only track drift.
_YAMUX_PING_S = 120
#: How often the mesh size is revisited besides every connect/disconnect.
_MESH_RESIZE_S = 30.0
#: Gossipsub v1.1 only. v1.2 adds IDONTWANT: every receiver sends a control RPC to every
#: mesh peer for every message, and py-libp2p attaches a signed peer record to each RPC that
#: the receiver verifies twice. In a small full mesh the IDONTWANT never arrives before the
#: duplicate it is meant to prevent, so it is pure cost: measured on a 4-node in-process
#: network, publish-to-all p50 went from 20.6 ms (v1.2) to 5.3 ms (v1.1 only).
#: (v1.3+ extensions are experimental in 0.8.1.)
_GOSSIP_PROTOCOLS = [PROTOCOL_ID_V11]
#: libp2p's seen-cache lifetime (trap 13); our verdict cache lives a little longer so a
#: duplicate never reaches a validator twice while libp2p could still forward it.
_SEEN_TTL_S = 120
_VERDICT_TTL_S = _SEEN_TTL_S + 30
_VERDICT_CACHE_MAX = 65_536
_BUCKETS_MAX = 4_096
_DIAL_TIMEOUT_S = 10.0
#: A bootstrap connection that lasted this long counts as stable: after it drops we redial at
#: once rather than continuing the backoff.
_STABLE_CONNECTION_S = 10.0
_STREAM_OPEN_TIMEOUT_S = 10.0
#: Our own round-trip probe of each new connection (P2PNode._probe_round_trips): 32-byte
#: /ipfs/ping/1.0.0 echoes on one stream, this many seconds after the connection opened, the
#: least kept. Spread out, because a daemon's first seconds are its busiest (its warm workers
#: import TensorFlow beside it), and every sample then errs upwards; five echoes per new
#: connection are all it costs.
_RTT_PROBE_AT_S = (1.0, 2.0, 4.0, 8.0, 16.0)
_RTT_PROBE_TIMEOUT_S = 30.0
_CLOSE_TIMEOUT_S = 5.0
_STREAM_CLOSE_TIMEOUT_S = 1.0
_READ_CHUNK = 64 << 10
#: DHT discovery: a self-lookup as soon as we (re)join through a bootstrap peer or an
#: explicit connect(), repeated after 2, 4, 8 ... s (x4 after a round that found nobody
#: new), settling at once every 5 minutes.
#: A lookup opens a stream to every neighbour and costs ~15 ms of CPU per neighbour on the
#: 2-core dev machine (multiselect, noise and yamux in Python, a signed record per entry),
#: so lookups are rare once joined and are NOT triggered by inbound connections (in an
#: N-node mesh that would be N-1 lookups per node; measured, that was most of the CPU a new
#: 8-node network spent in its first 15 s).
_DISCOVERY_REPEAT_S = 2.0
_DISCOVERY_MAX_S = 300.0
_DISCOVERY_LOOKUP_TIMEOUT_S = 10.0
_DISCOVERY_MAX_DIALS = 8
#: Upper bound on peers we dial on our own initiative (DHT discovery); small networks
#: end up fully meshed, large ones stop well below the connection manager's watermarks.
_DISCOVERY_TARGET_PEERS = 48
_KAD_PROTOCOL = "/ipfs/kad/1.0.0"
#: trap 20. A (peer, signed record) a host verified is trusted this long before it is
#: verified again (so the peer store's copy of its addresses, which libp2p files for 2 h,
#: is refreshed while the peer talks to us); at most this many are kept per host.
_SENDER_RECORD_RECHECK_S = 600.0
_SENDER_RECORDS_MAX = 4_096
#: trap 20. How long a host re-uses its own signed record on outgoing RPCs. A listen address
#: that changes reaches peers' peer stores this much later; discovery and our adverts carry
#: addresses of their own.
_OWN_RECORD_REUSE_S = 10.0
#: Circuit relay v2 (docs/design.md §10.7 "Reachability"). What a relay
#: (``P2PConfig.relay_service``) grants: a reservation lasts an hour and is refreshed by its
#: holder; a circuit lasts at most an hour (the holder's peers dial again); at most 16 circuits
#: at once per reservation, 128 reservations, and 4 GiB relayed per reservation. Relaying
#: costs the relay's bandwidth, so it is opt-in and bounded.
_RELAY_LIMITS = RelayLimits(
    duration=3600, data=4 << 30, max_circuit_conns=16, max_reservations=128, reservation_ttl=3600
)
#: A node behind a NAT (``P2PConfig.relays``) reserves again when less than this is left of
#: its reservation, and at once after its connection to the relay came back (a relay that
#: restarted has forgotten it). Checked at least this often:
_RESERVATION_MARGIN_S = 600.0
_RESERVATION_CHECK_S = 30.0
#: Reservations a relay grants to peers connected from one source (IPv4 /32, IPv6 /64):
#: identities are free, so without it one machine could take all 128 (issue 11's rule).
_RELAY_RESERVATIONS_PER_SOURCE = 8


@dataclass(frozen=True)
class _StreamPolicy:
    """What one peer may hold open on one protocol family (issue 11, held streams).

    ``max_per_peer`` concurrent inbound streams; one more is reset before any handler sees
    it (refusing the newcomer, never evicting an older stream: libp2p's pubsub treats the
    loss of a peer's inbound stream as the peer's death). ``idle_s``: a read that waits
    longer than this ends the stream.
    """

    family: str
    max_per_peer: int
    idle_s: float | None


#: By protocol prefix; the first match wins.
_STREAM_POLICIES = (
    # Gossipsub keeps ONE long-lived inbound stream per peer (two while a reconnect
    # overlaps). No idle timeout: a quiet network is not an idle peer, and resetting the
    # stream makes py-libp2p's pubsub drop the peer (Pubsub.stream_handler ->
    # _handle_dead_peer) while its connection stays up. The cap bounds what a stalled
    # stream can hold: 750 stalled streams from 3 identities used to cost ~790 MB.
    _StreamPolicy("/meshsub/", max_per_peer=2, idle_s=None),
    # Kademlia: request/response; go-libp2p-kad-dht closes a stream idle for 1 min. The
    # DHT's own global inbound limiter would otherwise let one peer's stalled streams
    # starve everyone's lookups.
    _StreamPolicy("/ipfs/kad/", max_per_peer=4, idle_s=30.0),
    _StreamPolicy("/ipfs/id/", max_per_peer=2, idle_s=10.0),  # identify and identify/push
    _StreamPolicy("/ipfs/ping/", max_per_peer=2, idle_s=60.0),  # pings come every few s
    # Circuit relay v2 (§10.7): at a relay, a hop stream carries a whole relayed connection
    # for its life; at a NAT'd node, a stop stream becomes one. A quiet connection is not
    # idle. The relay's own limits (_RELAY_LIMITS) bound circuits and bytes.
    _StreamPolicy("/libp2p/circuit/relay/0.2.0/hop", max_per_peer=16, idle_s=None),
    _StreamPolicy("/libp2p/circuit/relay/0.2.0/stop", max_per_peer=16, idle_s=None),
    # peerd's own protocols time out in 10-30 s in their handlers; this is the backstop.
    _StreamPolicy("", max_per_peer=64, idle_s=120.0),
)


class _PipelinedMultiselectClient(MultiselectClient):
    """trap 24: py-libp2p 0.8.1's multistream-select client writes ``/multistream/1.0.0``,
    waits for the listener's echo, and only then writes the protocol ID and waits again: two
    round trips before a new stream carries a byte (160 ms on the 40 ms WAN devnet, for every
    blob fetch, bid stream and DHT query). The listener reads the two lines one after the
    other whenever they arrive, so the client may send them together and read both answers:
    one round trip. go-multistream's ``SelectProtoOrFail`` has always written them in one
    batch, so every listener we talk to is used to it. With several candidate protocols, or a
    communicator we do not know, it falls back to libp2p's own sequence."""

    async def select_one_of(
        self,
        protocols: Any,
        communicator: Any,
        negotiate_timeout: int = DEFAULT_NEGOTIATE_TIMEOUT,
    ) -> TProtocol:
        choices = list(protocols)
        if len(choices) != 1 or not isinstance(communicator, MultiselectCommunicator):
            return await super().select_one_of(choices, communicator, negotiate_timeout)
        protocol = choices[0]
        with trio.move_on_after(negotiate_timeout):
            request = encode_delim(MULTISELECT_PROTOCOL_ID.encode()) + encode_delim(str(protocol).encode())
            try:
                await communicator.read_writer.write(request)
            # What libp2p's own MultiselectCommunicator.write maps to its error.
            except (IOException, AssertionError, ValueError) as exc:
                raise MultiselectClientError(f"negotiating {protocol}: write failed: {exc!r}") from exc
            try:
                handshake = await communicator.read()
                response = await communicator.read() if is_valid_handshake(handshake) else None
            except MultiselectCommunicatorError as exc:
                raise MultiselectClientError(f"negotiating {protocol}: {exc}") from exc
            if response is None:
                raise MultiselectClientError(f"multiselect protocol ID mismatch: got {handshake!r}")
            if response == str(protocol):
                return protocol
            if response == PROTOCOL_NOT_FOUND_MSG:
                raise MultiselectClientError(f"protocol not supported: {protocol}")
            raise MultiselectClientError(f"unrecognized response {response!r} to {protocol}")
        raise MultiselectClientError(f"response timed out after {negotiate_timeout}s, protocol {protocol}")


def _install_flood_publish(gossipsub: GossipSub) -> None:
    """Flood publishing (trap 23): a message we originate goes to every neighbour subscribed to
    the topic, not only to our mesh peers, as go-libp2p's gossipsub does by default. Every
    neighbour then has it after one hop whatever the mesh degree, so the mesh can be small: it
    only forwards (a few duplicates per node) to peers that are not our neighbours and repairs
    a lost direct send. Messages we forward still go to the mesh only."""
    inner = gossipsub._get_peers_to_send

    def peers_to_send(
        topic_ids: Iterable[str], msg_forwarder: ID, origin: ID, msg_id: bytes | None = None
    ) -> Iterable[ID]:
        topics = list(topic_ids)
        peers = set(inner(topics, msg_forwarder, origin, msg_id))
        pubsub = gossipsub.pubsub
        if pubsub is not None and origin == pubsub.my_id:
            for topic in topics:
                peers.update(p for p in pubsub.peer_topics.get(topic, ()) if p in gossipsub.peer_protocol)
            peers.discard(origin)
        return peers

    gossipsub._get_peers_to_send = peers_to_send  # type: ignore[method-assign]


def _install_sparse_ihave(gossipsub: GossipSub) -> None:
    """IHAVE on one heartbeat in ``gossip_window`` (trap 26). py-libp2p gossips the message ids
    of the last ``gossip_window`` heartbeats (its message cache's window) on every heartbeat,
    so each id is announced that many times over; gossiping once per window announces each id
    once, and an idle node sends (and receives) a third of the control RPCs for the same
    repair. The cadence is read from the cache itself, so it cannot drift from the window."""
    every = gossipsub.mcache.window_size
    inner = gossipsub.gossip_heartbeat
    beats = itertools.count()

    def gossip_heartbeat() -> defaultdict[ID, dict[str, list[bytes]]]:
        if next(beats) % every:
            return defaultdict(dict)
        return inner()

    gossipsub.gossip_heartbeat = gossip_heartbeat  # type: ignore[method-assign]


def _install_direct_push(pubsub: Pubsub, stats: dict[str, int]) -> None:
    """trap 27: pubsub hands every message it reads (duplicates included) to
    ``manager.run_task(push_msg, ...)``, whose bookkeeping scans every task the service holds
    to find the caller's (a task per neighbour and more) and builds a named FunctionTask: 8.6 %
    of an idle daemon's CPU at 20 daemons, more than the Ed25519 checks. push_msg goes straight
    into the same service's task nursery instead, so it is still cancelled with the service.
    A push that raises is counted and dropped: through run_task it would cancel the whole
    pubsub service (one bad message from any peer stopping gossip)."""
    manager = pubsub.manager
    inner = manager.run_task
    push = pubsub.push_msg

    async def guarded_push(peer_id: ID, msg: rpc_pb2.Message) -> None:
        try:
            await push(peer_id, msg)
        except Exception as exc:  # a libp2p bug on one message; never the whole service
            stats["gossip_push_errors"] += 1
            log.warning("dropping a gossip message pubsub failed on: %r", exc)

    def run_task(async_fn: Any, *args: Any, daemon: bool = False, name: str | None = None, **kw: Any) -> None:
        nursery = getattr(manager, "_task_nursery", None)
        if async_fn == push and not daemon and nursery is not None and manager.is_running:
            nursery.start_soon(guarded_push, *args)
            return
        inner(async_fn, *args, daemon=daemon, name=name, **kw)

    manager.run_task = run_task  # type: ignore[method-assign]


def _mesh_degrees(peers: int) -> tuple[int, int, int]:
    """(D, D_low, D_high) for a node with ``peers`` neighbours: a full mesh while it is
    small, a small mesh beyond (see _FULL_MESH_PEERS)."""
    if peers <= _FULL_MESH_PEERS:
        full = max(1, peers)
        return full, full, _FULL_MESH_PEERS
    return _MESH_D, _MESH_D_LOW, _MESH_D_HIGH


def _policy_for(protocol: str) -> _StreamPolicy:
    return next(p for p in _STREAM_POLICIES if protocol.startswith(p.family))


@dataclass(frozen=True)
class GossipMessage:
    """One gossip message as a validator sees it."""

    topic: str
    data: bytes
    origin: str  # base58 peer ID of the originator (strict-signing ``from``, verified by libp2p)
    received_from: str  # base58 peer ID of the neighbour that forwarded it


Validator = Callable[[GossipMessage], Awaitable[bool]]
StreamHandler = Callable[[FrameStream], Awaitable[None]]


@dataclass(frozen=True)
class P2PConfig:
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    bootstrap: tuple[str, ...] = ()  # full multiaddrs with /p2p/<id>
    # What peers learn as our addresses (identify, signed peer records, DHT, adverts) in
    # place of the listen addresses; empty: the listen addresses (wildcards expanded).
    # For a NAT or port forward, and for the emulated WAN (docs/devnet.md), where peers
    # must only ever learn the link emulator's address.
    announce: tuple[str, ...] = ()
    mdns: bool = False  # opt-in only; never used in tests
    heartbeat_s: float = 1.0  # gossipsub heartbeat (trap 3)
    max_msgs_per_origin_per_s: float = 200.0  # per-ORIGIN token bucket per topic (trap 4); burst = 2x
    # 60 KiB: py-libp2p 0.8.1 splits larger gossip RPCs into several yamux frames and a
    # concurrent write can land between them, corrupting the message (seen in tests).
    # Every peerd envelope is far below this; bulk data moves as blobs.
    max_gossip_bytes: int = 60 * 1024  # effective cap is min(this, _LIBP2P_MAX_GOSSIP)
    dial_backoff_initial_s: float = 0.5
    dial_backoff_max_s: float = 30.0
    # How long the peer store keeps the addresses of a peer we dialled. libp2p's own figure
    # is 120 s; after it lapses the peer store raises for that peer (see _known_addrs).
    peer_addr_ttl_s: float = 120.0
    # Gossip a neighbour relays for OTHER origins, per topic (issue 11: identities are free,
    # so a per-origin limit alone lets one connection carry any number of fake origins).
    # Honest relay load is about N / (2 x mesh degree) adverts/s per neighbour, so 100/s
    # carries adverts for ~1,600 peers; burst = 2x.
    max_relayed_per_neighbour_per_s: float = 100.0
    # Handshakes in progress from one source address (IPv4 /32, IPv6 /64). libp2p's only
    # limit is ~250 in total, which one address could hold by itself (issue 11).
    max_pending_handshakes_per_source: int = 8
    # Circuit relay v2 (docs/design.md §10.7). ``relay_service``: serve the hop side, so that
    # peers behind a NAT can be reached through us (within _RELAY_LIMITS). ``relays``: we are
    # behind a NAT; keep a connection and a reservation at each of these relays (full
    # multiaddrs with /p2p/<id>), announce our circuit addresses through them in place of
    # the listen addresses (plus ``announce``), and run the DHT as a client.
    relay_service: bool = False
    relays: tuple[str, ...] = ()


def _is_circuit(addr: multiaddr.Multiaddr) -> bool:
    return "/p2p-circuit" in str(addr)


def _conn_is_relayed(conn: INetConn) -> bool:
    # Both ends mark a circuit connection RELAYED (the dialler's circuit transport, the
    # listener's stop handler). Not its transport addresses: for a connection whose own were
    # never set, libp2p answers with the peer store's, which for a NAT'd peer that dialled us
    # directly are its circuit addresses.
    try:
        return bool(conn.get_connection_type() == ConnectionType.RELAYED)
    except Exception:
        return False


def _circuit_to(addr: multiaddr.Multiaddr, peer: ID) -> multiaddr.Multiaddr:
    """``addr`` ending in ``/p2p/<peer>``: what the circuit transport dials. The peer store
    files a peer's addresses without it."""
    text = str(addr)
    suffix = f"/p2p/{peer.to_base58()}"
    return addr if text.endswith(suffix) else multiaddr.Multiaddr(text + suffix)


# --- error translation: the ONE place where libp2p exceptions become ours ----------------


def _reason_for(exc: BaseException) -> str:
    if isinstance(exc, StreamEOF):
        return "closed"
    if isinstance(exc, StreamReset):
        return "reset"
    if isinstance(exc, StreamClosed):
        return "closed"
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    if isinstance(exc, StreamFailure):
        return "protocol"
    if isinstance(exc, SwarmException | OSError):
        return "unreachable"
    return "transport"


@contextlib.contextmanager
def _translate_errors(what: str) -> Iterator[None]:
    """Map any exception raised by libp2p (or by a timeout around it) to TransportError.

    Our own ProtocolErrors pass through unchanged; cancellation (a BaseException) is never
    touched. libp2p raises a wide, unstable set of types (its own hierarchy, OSError,
    trio resource errors, ValueError from multiaddr, exception groups from its nurseries),
    so the mapping is deliberately "everything that is an Exception".
    """
    try:
        yield
    except ProtocolError:
        raise
    except Exception as exc:
        reason = _reason_for(exc)
        log.debug("%s failed (%s): %r", what, reason, exc)
        raise TransportError(f"{what}: {exc or type(exc).__name__}", reason=reason) from exc


# --- framed streams over libp2p streams ----------------------------------------------------


class _Libp2pFrameStream:
    """:class:`peerd.streams.FrameStream` over a libp2p stream (4-byte frames, MAX_FRAME cap)."""

    def __init__(self, stream: INetStream, remote_peer: str) -> None:
        self.remote_peer = remote_peer
        self._stream = stream
        self._decoder = FrameDecoder(max_frame=MAX_FRAME)
        # Yamux splits one write into window-sized chunks; two concurrent senders would
        # interleave them and corrupt the framing, so sends (and receives) are serialised.
        self._send_lock = trio.Lock()
        self._recv_lock = trio.Lock()
        self._closed = False

    async def send(self, frame: bytes) -> None:
        if len(frame) > MAX_FRAME:
            # Same behaviour as peerd.streams.MemoryFrameStream, which component tests use.
            raise TransportError("frame too large", reason="oversized")
        data = encode_frame(frame)
        async with self._send_lock:
            with _translate_errors(f"send to {self.remote_peer}"):
                await self._stream.write(data)

    async def receive(self) -> bytes:
        async with self._recv_lock:
            while True:
                try:
                    frame = self._decoder.next_frame()
                except RemoteProtocolError as exc:
                    # The header announced more than MAX_FRAME: drop the stream before
                    # buffering any of it.
                    await self._reset()
                    raise TransportError(str(exc), reason="oversized") from exc
                if frame is not None:
                    return frame
                with _translate_errors(f"receive from {self.remote_peer}"):
                    chunk = await self._stream.read(_READ_CHUNK)
                if not chunk:
                    raise TransportError("stream closed by peer", reason="closed")
                self._decoder.feed(chunk)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + _STREAM_CLOSE_TIMEOUT_S
            try:
                await self._stream.close()
                return
            except Exception as exc:  # close must never raise (FrameStream contract)
                log.debug("closing stream to %s failed: %r", self.remote_peer, exc)
        await self._reset()

    async def _reset(self) -> None:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + _STREAM_CLOSE_TIMEOUT_S
            try:
                await self._stream.reset()
            except Exception as exc:
                log.debug("resetting stream to %s failed: %r", self.remote_peer, exc)


# --- per-origin rate limit (trap 4) ---------------------------------------------------------


class _TokenBucket:
    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def is_full(self, now: float) -> bool:
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


def _take(
    buckets: dict[tuple[str, bytes], _TokenBucket],
    key: tuple[str, bytes],
    rate: float,
    now: float,
) -> bool:
    """One token from ``key``'s bucket (rate/s, burst 2x), bounded to _BUCKETS_MAX buckets."""
    bucket = buckets.get(key)
    if bucket is None:
        if len(buckets) >= _BUCKETS_MAX:
            # A full bucket is indistinguishable from a fresh one: forget those.
            for k in [k for k, b in buckets.items() if b.is_full(now)]:
                del buckets[k]
        bucket = buckets[key] = _TokenBucket(rate, 2 * rate, now)
    return bucket.take(now)


class _Verdict:
    """The outcome of validating one (topic, message id); waiters share one validator call."""

    __slots__ = ("done", "expires", "result")

    def __init__(self, expires: float) -> None:
        self.done = trio.Event()
        self.result = False
        self.expires = expires


# --- inbound stream guard (issue 11: held streams) --------------------------------------------


class _StreamIdle(StreamReset):
    """Raised by a guarded read that saw no data for the protocol's idle time.

    A StreamReset, so libp2p's own handlers take it as the stream's end (pubsub and the
    DHT catch StreamError and reset).
    """


async def _reset_quietly(stream: INetStream) -> None:
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + _STREAM_CLOSE_TIMEOUT_S
        with contextlib.suppress(Exception):
            await stream.reset()


class _InboundGuard:
    """Wraps every inbound stream handler, libp2p's own included, with :data:`_STREAM_POLICIES`.

    libp2p 0.8.1 bounds inbound streams only in total (the resource manager), so one
    peer could hold thousands of stalled ``/meshsub`` or ``/ipfs/kad`` streams, each
    pinning buffers. Here each (peer, protocol family) gets a concurrency cap and each
    read an idle deadline; a refused or idle stream is reset and counted.
    """

    def __init__(self, stats: dict[str, int]) -> None:
        self._stats = stats
        self._open: dict[tuple[str, str], int] = {}

    def open_streams(self) -> int:
        return sum(self._open.values())

    def wrap(
        self, protocol: str, handler: Callable[[INetStream], Awaitable[None]]
    ) -> Callable[[INetStream], Awaitable[None]]:
        policy = _policy_for(protocol)

        async def guarded(stream: INetStream) -> None:
            try:
                peer = stream.muxed_conn.peer_id.to_base58()
            except Exception:
                peer = "?"
            key = (peer, policy.family)
            held = self._open.get(key, 0)
            if held >= policy.max_per_peer:
                self._stats["streams_capped"] += 1
                log.debug("refusing a %s stream from %s: %d already open", protocol, peer, held)
                await _reset_quietly(stream)
                return
            self._open[key] = held + 1
            if policy.idle_s is not None:
                self._limit_reads(stream, policy.idle_s)
            try:
                await handler(stream)
            except _StreamIdle:
                await _reset_quietly(stream)
            except Exception as exc:
                # trap 7: nothing may reach libp2p's stream dispatch, which would tear the host down.
                self._stats["handler_errors"] += 1
                log.debug("%s handler raised on a stream from %s: %r", protocol, peer, exc)
                await _reset_quietly(stream)
            finally:
                left = self._open[key] - 1
                if left:
                    self._open[key] = left
                else:
                    del self._open[key]

        return guarded

    def _limit_reads(self, stream: INetStream, idle_s: float) -> None:
        # Shadow the instance's read: the same object reaches libp2p's handlers and our
        # framing, and nothing else about the stream changes.
        inner = stream.read
        stats = self._stats

        async def read(n: int | None = None) -> bytes:
            with trio.move_on_after(idle_s):
                return await inner(n)
            stats["streams_idle_closed"] += 1
            raise _StreamIdle(f"no data for {idle_s:.0f} s")

        stream.read = read  # type: ignore[method-assign]


# --- handshakes per source (issue 11: the bootstrap peer can be locked) ------------------------


def _source_key(raw_conn: Any) -> str | None:
    """The source a pending-handshake limit is kept under: IPv4 /32, IPv6 /64 (one host's
    usual allocation, so rotating addresses inside it does not help)."""
    try:
        remote = raw_conn.get_remote_address()
        return _source_of_ip(remote[0])
    except Exception:
        return None


def _source_of_conn(conn: INetConn) -> str | None:
    """:func:`_source_key` for an established, direct connection; None for a circuit."""
    if _conn_is_relayed(conn):
        return None
    try:
        for addr in conn.get_transport_addresses():
            for proto in ("ip4", "ip6"):
                with contextlib.suppress(Exception):
                    return _source_of_ip(addr.value_for_protocol(proto))
    except Exception:
        pass
    return None


def _source_of_ip(text: str) -> str:
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class _HandshakeGate:
    """Bounds inbound handshakes in progress per source (issue 11: the bootstrap peer can
    be locked). libp2p admits ~250 upgrades at once in total and each may take its 10 s
    upgrade timeout, so ~25 stalled connects/s from one address kept a node closed to all.
    Installed over the swarm's ``upgrade_inbound_raw_conn``: the count covers exactly the
    Noise + yamux upgrade, not the connection's life.
    """

    def __init__(self, per_source: int, stats: dict[str, int]) -> None:
        self._per_source = per_source
        self._stats = stats
        self._pending: dict[str, int] = {}

    def install(self, network: Any) -> None:
        inner = network.upgrade_inbound_raw_conn

        async def upgrade(raw_conn: Any, maddr: multiaddr.Multiaddr) -> Any:
            source = _source_key(raw_conn)
            if source is None:
                return await inner(raw_conn, maddr)
            held = self._pending.get(source, 0)
            if held >= self._per_source:
                self._stats["handshakes_refused"] += 1
                with contextlib.suppress(Exception):
                    await raw_conn.close()
                raise SwarmException(f"{held} handshakes already in progress from {source}")
            self._pending[source] = held + 1
            try:
                return await inner(raw_conn, maddr)
            finally:
                left = self._pending[source] - 1
                if left:
                    self._pending[source] = left
                else:
                    del self._pending[source]

        network.upgrade_inbound_raw_conn = upgrade


# --- connection events ---------------------------------------------------------------------


class _ConnectionWatcher(INotifee):
    """Wakes waiters on every connect/disconnect (bootstrap reconnects, discovery)."""

    def __init__(self) -> None:
        self.changed = trio.Event()
        #: Told of every new connection (the advert service re-advertises for newcomers).
        self.on_connected: list[Callable[[], None]] = []

    def _pulse(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._pulse()
        for callback in self.on_connected:
            try:
                callback()
            except Exception:  # trap 7: nothing may reach libp2p's notifee dispatch
                log.exception("a connection listener raised")

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._pulse()

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None


class _Demote(logging.Filter):
    """Turns libp2p's ERROR/WARNING records for ordinary network events into DEBUG ones.

    libp2p logs a peer being down, a connection reset or a failed negotiation at ERROR; we
    map those to TransportError and log them ourselves at the right level, so the originals
    would only alarm operators (a bootstrap peer that is down would log an ERROR per retry).
    """

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self._prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._prefixes or str(record.msg).startswith(self._prefixes):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


_process_configured = False


async def _credit_at_half_window(self: YamuxStream, *, bytes_read: int = 0) -> None:
    """Replaces ``YamuxStream._auto_tune_and_send_window_update`` (trap 17): credit the
    sender once half the stream's window is consumed, as go-yamux's ``sendWindowUpdate``
    does, and at that first credit grow the window to yamux's 16 MiB maximum.

    py-libp2p 0.8.1's own version has a "partial slack" branch that credits whatever was
    consumed whenever anything was, so every message read from a stream (a gossip RPC, a
    bid) cost one WINDOW_UPDATE frame back: a Noise message, a send and the peer's decrypt,
    as many frames as the data itself (counted on an idle 20-daemon devnet: 166 window
    updates sent for 174 data frames a minute; docs/benchmarks.md, 2026-12-05). Its
    ``PY_YAMUX_RELEASE_ON_READ`` switch only covers the rest. That branch also credits the
    bytes just read twice, so a bulk stream's window grew without bound and its sender
    never waited for credit.

    Why the maximum at once: py-libp2p's auto-tuning doubles the window only when credits
    come within 4 round trips, which the milliseconds each event loop adds to a credit
    defeat; with go-yamux's rule alone the window stayed at 256 KiB and a 128 MiB task input
    between two daemons fell from 158 to 40 MB/s, and credit every 64 KiB still cost the
    sender 10 % more CPU than the unbounded window. 16 MiB is what go-yamux's auto-tuning
    grows to; py-libp2p never enforced the receive window anyway (a peer that overruns it
    is logged and clamped), and our protocols bound what they have in flight themselves
    (the blob protocol's 4 MiB window, one request per stream).

    No stall: a blocked sender means the window is consumed, and the reader empties the
    buffer as it reads (our framed streams read whatever is there), so the missing credit
    reaches the whole window."""
    del bytes_read  # the credit is computed from the window, not from one read
    total = 0
    async with self.window_lock:
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        missing = self.target_recv_window - (self.recv_window + buffered)
        if missing > 0 and missing >= self.target_recv_window // 2:
            self.target_recv_window = _yamux_module.MAX_WINDOW_SIZE
            total = self._grow_to_delta(buffered)
    if total > 0:
        await self.send_window_update(total, skip_lock=True)


def _configure_libp2p_process() -> None:
    """Process-wide libp2p settings (logging and yamux), applied once.

    ``import libp2p`` detaches its logger tree (``propagate=False``, no handler), so its
    warnings would go to stderr through logging's last-resort handler, bypassing the
    daemon's log format; we route WARNING+ into the daemon's logging, minus known noise.
    """
    global _process_configured
    if _process_configured:
        return
    _process_configured = True
    # trap 17: py-libp2p's yamux credits the sender's window after every read (see
    # _credit_at_half_window).
    YamuxStream._auto_tune_and_send_window_update = _credit_at_half_window  # type: ignore[method-assign]
    # trap 25: py-libp2p pings from both ends of every connection every 30 s; its ping loop
    # reads this module global at each wait.
    _yamux_module.RTT_MEASURE_INTERVAL = _YAMUX_PING_S
    # trap 22: each neighbour's outbound gossip queue holds 32 RPCs (go-libp2p-pubsub's
    # default, fixed as a default argument, with no option) and drops what does not fit,
    # silently: a burst of 100 publishes (a busy submitter's announces, awards and leases)
    # lost messages to its neighbours here; with 128 it arrives whole (a tight loop of 1,000
    # still overruns it). 128 queued RPCs of at most max_gossip_bytes each bound a stalled
    # neighbour's queue to ~8 MiB.
    RpcQueue.__init__.__defaults__ = (_OUTBOUND_QUEUE, DefaultMaxMessageSize)
    root = logging.getLogger("libp2p")
    root.propagate = True
    root.setLevel(logging.WARNING)
    # trap 14: empty "Failed to read DHT message from stream" warnings on every closed stream.
    logging.getLogger("libp2p.kad_dht").setLevel(logging.ERROR)
    # trap 6: we drain subscription queues only so they never fill; a momentary overflow
    # loses nothing, because we consume gossip through validators, not through the queue.
    logging.getLogger("libp2p.pubsub.pubsub").addFilter(_Demote("fail to deliver message to subscription"))
    # Ordinary network events that libp2p reports at ERROR and we report as TransportError.
    logging.getLogger("libp2p.transport.tcp.tcp").addFilter(_Demote())  # dial refused / unreachable
    logging.getLogger("libp2p.protocol_muxer.multiselect_client").addFilter(_Demote())
    logging.getLogger("libp2p.host.basic_host").addFilter(_Demote("Failed to open stream"))
    logging.getLogger("libp2p.stream_muxer.yamux.yamux").addFilter(_Demote("Error in handle_incoming"))
    # A dialled peer that hangs up mid-handshake (every peer's shutdown): a TransportError to us.
    logging.getLogger("libp2p.network.swarm").addFilter(_Demote("failed to upgrade security"))
    # Logs its state at INFO on every cycle; warnings and errors still pass.
    logging.getLogger("libp2p.network.auto_connector").setLevel(logging.WARNING)
    _install_sender_record_caches()
    _install_buffered_rpc_reads()


def _uvarint(buf: bytearray) -> tuple[int, int] | None:
    """(value, bytes it took) of the unsigned varint that starts ``buf``; None while it is
    incomplete; ParseError past 10 bytes, as libp2p's reader."""
    value = shift = 0
    for taken, byte in enumerate(buf[:10], 1):
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, taken
        shift += 7
    if len(buf) >= 10:
        raise ParseError("Varint decoding error: integer exceeds maximum size of 64 bits")
    return None


def _install_buffered_rpc_reads() -> None:
    """trap 28: pubsub reads each RPC's varint length one byte at a time, each byte a whole
    yamux ``read_stream`` (its lock, its bookkeeping, its debug strings formatted whether
    logged or not), then the body: three reads per RPC. Here each stream keeps what it read
    beyond the RPC in a buffer and reads what has arrived, up to 64 KiB, in one call: one read
    per RPC, or less when RPCs arrive together. Only pubsub's read loop reads these streams,
    so nothing else misses the buffered bytes. Same errors as libp2p's reader: a varint over
    10 bytes is a ParseError, a length over the limit MessageTooLarge (before the body is
    read), a stream that ends inside an RPC IncompleteReadError."""
    from libp2p.pubsub import pubsub as pubsub_module

    buffers: weakref.WeakKeyDictionary[Any, bytearray] = weakref.WeakKeyDictionary()

    async def fill(reader: Any, buf: bytearray, want: int) -> None:
        chunk = await reader.read(max(want, _READ_CHUNK))
        if not chunk:
            raise IncompleteReadError(
                f"stream ended inside an RPC ({len(buf)} bytes buffered)",
                expected_bytes=want,
                received_bytes=0,
            )
        buf += chunk

    async def read_rpc(reader: Any, max_length: int) -> bytes:
        buf = buffers.get(reader)
        if buf is None:
            buf = buffers[reader] = bytearray()
        while (head := _uvarint(buf)) is None:
            await fill(reader, buf, 1)
        length, used = head
        if length > max_length:
            raise MessageTooLarge(f"Message length {length} exceeds maximum allowed {max_length}")
        end = used + length
        while len(buf) < end:
            await fill(reader, buf, end - len(buf))
        rpc = bytes(buf[used:end])
        del buf[:end]
        return rpc

    pubsub_module.read_varint_prefixed_bytes_limited = read_rpc


def _install_sender_record_caches() -> None:
    """trap 20: verify a peer's signed record once, not on every pubsub RPC; re-use our own.

    py-libp2p 0.8.1 has no option for either. On an idle 10-daemon devnet the record work was
    the largest single part of libp2p's share of the CPU after forwarding itself: every
    duplicate of a gossiped message and every IHAVE/GRAFT carries a record, each one was
    unmarshalled and its Ed25519 signature checked (twice for control RPCs), and each one
    we sent rebuilt our address list (~2 ms on the loaded dev machine). The semantics stay:
    a record is still verified before it is believed, bytes that failed verification from a
    peer still get its RPC ignored, and a new record from a peer (its addresses changed) is
    verified at once. Only repeats of bytes already judged skip the work.
    """
    import weakref

    from libp2p.pubsub import gossipsub as gossipsub_module
    from libp2p.pubsub import pubsub as pubsub_module

    consume = pubsub_module.maybe_consume_signed_record
    own_record = pubsub_module.env_to_send_in_RPC
    judged: weakref.WeakKeyDictionary[IHost, OrderedDict[tuple[bytes, bytes], tuple[float, bool]]]
    judged = weakref.WeakKeyDictionary()
    ours: weakref.WeakKeyDictionary[IHost, tuple[float, object, bytes]] = weakref.WeakKeyDictionary()

    def consume_once(msg: rpc_pb2.RPC, host: IHost, peer_id: ID) -> bool:
        if not msg.HasField("senderRecord"):
            return True
        now = time.monotonic()
        seen = judged.get(host)
        if seen is None:
            seen = judged[host] = OrderedDict()
        key = (peer_id.to_bytes(), bytes(msg.senderRecord))
        hit = seen.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        ok = bool(consume(msg, host, peer_id))
        seen[key] = (now + _SENDER_RECORD_RECHECK_S, ok)
        seen.move_to_end(key)
        while len(seen) > _SENDER_RECORDS_MAX:
            seen.popitem(last=False)
        return ok

    def own_record_reused(host: IHost) -> tuple[bytes, bool]:
        # Only while the peer store's current record is the one we cached: identify issues
        # records too, and a peer that has seen a newer one rejects an older one (lower seq)
        # and with it the whole RPC.
        now = time.monotonic()
        current = host.get_peerstore().get_local_record()
        hit = ours.get(host)
        if hit is not None and hit[0] > now and hit[1] is current:
            return hit[2], False
        out = own_record(host)
        ours[host] = (now + _OWN_RECORD_REUSE_S, host.get_peerstore().get_local_record(), out[0])
        return out

    for module in (pubsub_module, gossipsub_module):
        module.maybe_consume_signed_record = consume_once  # type: ignore[attr-defined]
        module.env_to_send_in_RPC = own_record_reused  # type: ignore[attr-defined]


_ADDRS_CACHE_S = 60.0
_addrs_cache: dict[tuple[bytes, ...], tuple[float, list[multiaddr.Multiaddr]]] = {}


def _advertised_addrs(candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    """Replace wildcard listen addresses (0.0.0.0, ::) by the machine's interface addresses.

    libp2p advertises the bound socket address; a wildcard one is useless to a remote peer
    (DHT records, listen_addrs()) and dialling it reaches whatever listens locally.
    libp2p calls this for every pubsub RPC it sends (signed peer record), and enumerating
    interfaces takes ~0.35 ms, so results are kept for a minute.
    """
    key = tuple(a.to_bytes() for a in candidates)
    now = time.monotonic()
    hit = _addrs_cache.get(key)
    if hit is not None and hit[0] > now:
        return list(hit[1])
    out: list[multiaddr.Multiaddr] = []
    for addr in candidates:
        names = {p.name for p in addr.protocols()}
        ip = next((addr.value_for_protocol(n) for n in ("ip4", "ip6") if n in names), None)
        if ip is not None and ipaddress.ip_address(ip).is_unspecified:
            out.extend(a for a in expand_wildcard_address(addr) if a not in out)
        elif addr not in out:
            out.append(addr)
    if len(_addrs_cache) > 64:
        _addrs_cache.clear()
    _addrs_cache[key] = (now + _ADDRS_CACHE_S, out)
    return list(out)


def _parse_peer_id(peer_id: str) -> ID:
    try:
        return ID.from_base58(peer_id)
    except Exception as exc:
        raise LocalProtocolError(f"not a peer ID: {peer_id!r}", reason="bad_peer_id") from exc


def _parse_multiaddr(addr: str) -> multiaddr.Multiaddr:
    try:
        return multiaddr.Multiaddr(addr)
    except Exception as exc:
        raise LocalProtocolError(f"not a multiaddr: {addr!r}", reason="bad_multiaddr") from exc


def _parse_p2p_addr(addr: str) -> PeerInfo:
    try:
        return info_from_p2p_addr(multiaddr.Multiaddr(addr))
    except Exception as exc:
        raise LocalProtocolError(
            f"not a multiaddr ending in /p2p/<peer id>: {addr!r}", reason="bad_multiaddr"
        ) from exc


class P2PNode:
    """A libp2p host with gossipsub, Kademlia peer routing and framed streams.

    Use from one trio run: ``await nursery.start(node.run)``; cancel the nursery to stop.
    """

    def __init__(self, seed: bytes, config: P2PConfig) -> None:
        if not isinstance(seed, bytes | bytearray) or len(seed) != 32:
            raise LocalProtocolError("seed must be a 32-byte Ed25519 private key", reason="bad_seed")
        positive = {
            "heartbeat_s": config.heartbeat_s,
            "max_msgs_per_origin_per_s": config.max_msgs_per_origin_per_s,
            "max_gossip_bytes": config.max_gossip_bytes,
            "dial_backoff_initial_s": config.dial_backoff_initial_s,
            "peer_addr_ttl_s": config.peer_addr_ttl_s,
            "max_relayed_per_neighbour_per_s": config.max_relayed_per_neighbour_per_s,
            "max_pending_handshakes_per_source": config.max_pending_handshakes_per_source,
        }
        for name, value in positive.items():
            if not value > 0:
                raise LocalProtocolError(f"P2PConfig.{name} must be > 0, got {value!r}", reason="bad_config")
        if config.dial_backoff_max_s < config.dial_backoff_initial_s:
            raise LocalProtocolError("P2PConfig.dial_backoff_max_s < initial", reason="bad_config")
        _configure_libp2p_process()
        self._config = config
        self._listen = [_parse_multiaddr(a) for a in config.listen]
        for addr in config.bootstrap:
            _parse_p2p_addr(addr)  # fail at construction, not in a background task
        self._announce = [_parse_multiaddr(a) for a in config.announce]
        self._key_pair: KeyPair = create_new_key_pair(bytes(seed))
        self._id = ID.from_pubkey(self._key_pair.public_key)
        # A fleet's shared config may name the relay itself among its relays: skipped there.
        parsed = ((a, _parse_p2p_addr(a)) for a in config.relays)
        #: (configured address, its peer) for each relay we reserve at (docs/design.md §10.7).
        self._relays = [(a, info) for a, info in parsed if info.peer_id != self._id]
        #: Relay peer ID -> the connection our reservation there was made on (see _keep_reserved).
        self._reserved_on: dict[ID, Any] = {}
        self._relay_transport: CircuitV2Transport | None = None
        self._address_book: Callable[[str], Sequence[str]] = lambda _peer: ()
        self._max_gossip = min(config.max_gossip_bytes, _LIBP2P_MAX_GOSSIP)
        self._validators: dict[str, Validator] = {}
        self._handlers: dict[str, StreamHandler] = {}
        self._stats: dict[str, int] = dict.fromkeys(
            (
                "gossip_published",
                "gossip_accepted",
                "gossip_rejected",
                "gossip_rate_limited",
                "gossip_oversized",
                "validator_errors",
                "validator_timeouts",
                "handler_errors",
                "streams_accepted",
                "streams_opened",
                "dials_ok",
                "dials_failed",
                "discovery_lookups",
                "discovery_errors",
                "dht_peers_refused",
                "dht_peers_forgotten",
                "gossip_relay_limited",
                "streams_capped",
                "streams_idle_closed",
                "handshakes_refused",
                "mesh_resized",
                "gossip_push_errors",
                "dials_relayed",
                "relay_reservations",
                "relay_reservations_failed",
                "relay_reservations_refused",
            ),
            0,
        )
        #: The least round trip our own pings measured to each connected peer (_probe_round_trips).
        self._rtt_min: dict[str, float] = {}
        self._verdicts: OrderedDict[tuple[str, bytes], _Verdict] = OrderedDict()
        self._buckets: dict[tuple[str, bytes], _TokenBucket] = {}
        self._host: IHost | None = None
        self._pubsub: Pubsub | None = None
        self._dht: KadDHT | None = None
        self._relay_buckets: dict[tuple[str, bytes], _TokenBucket] = {}
        self._guard = _InboundGuard(self._stats)
        self._handshakes = _HandshakeGate(config.max_pending_handshakes_per_source, self._stats)
        self._watcher = _ConnectionWatcher()
        self._discovery_kick = trio.Event()
        self._running = False

    # --- identity and state -------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self._id.to_base58()

    def listen_addrs(self) -> list[str]:
        """Full multiaddrs including ``/p2p/<id>``; empty until ``run`` reported started."""
        if self._host is None:
            return []
        return [str(a) for a in self._host.get_addrs()]

    def connected_peers(self) -> list[str]:
        if self._host is None:
            return []
        return sorted(p.to_base58() for p in self._host.get_connected_peers())

    def relayed(self, peer_id: str) -> bool:
        """Whether our only way to ``peer_id`` is through a relay (docs/design.md §10.7): every
        connection to it is a circuit, or there is none and every address we know for it is a
        circuit address. Bulk data is better fetched from a peer that is not: a relayed byte
        costs the relay's bandwidth and ~2.7 x the CPU of a direct one (benchmarks.md)."""
        host = self._host
        if host is None:
            return False
        try:
            peer = ID.from_base58(peer_id)
        except Exception:
            return False
        conns = host.get_network().get_connections(peer)
        if conns:
            return all(_conn_is_relayed(c) for c in conns)
        addrs = self._known_addrs(peer) or self._addrs_announced_by(peer)
        return bool(addrs) and all(_is_circuit(a) for a in addrs)

    def round_trip_s(self, peer_id: str) -> float | None:
        """The round trip to a connected peer, in seconds, or None while not connected or not
        measured yet: the least of what our own pings right after the connection opened
        measured (:meth:`_probe_round_trips`) and of the muxer's smoothed figure (py-libp2p's
        yamux pings each connection 0.5 s after it opens, then every _YAMUX_PING_S, trap 25).
        Costs nothing to read.

        The least, because a sample only ever errs upwards: it also times both event loops,
        and a daemon that is busy (starting its workers, training, a bulk transfer on the same
        connection) answers late. yamux's one early sample read 3.1 ms between two daemons on
        one host while they started (0.05-1.6 ms at rest), which made them far to each other
        (peerd/submitter.py NEAR_RTT_S) for the next 30 s."""
        if self._host is None:
            return None
        try:
            pid = ID.from_base58(peer_id)
        except Exception:
            return None
        network = cast(Any, self._host.get_network())
        best = self._rtt_min.get(peer_id)
        for conn in network.get_connections(pid):
            rtt = getattr(getattr(conn, "muxed_conn", None), "rtt", None)
            if callable(rtt) and (value := float(rtt())) > 0:
                best = value if best is None else min(best, value)
        return best

    async def _probe_round_trips(self, host: IHost) -> None:
        """Ping every newly connected peer a few times and keep the least round trip
        (:meth:`round_trip_s`); forget it when the peer disconnects. Best effort: a peer that
        does not answer keeps only the muxer's figure."""
        probed: set[str] = set()
        async with trio.open_nursery() as nursery:
            while True:
                changed = self._watcher.changed
                connected = set(self.connected_peers())
                for gone in probed - connected:
                    probed.discard(gone)
                    self._rtt_min.pop(gone, None)
                for peer in sorted(connected - probed):
                    probed.add(peer)
                    nursery.start_soon(self._probe_round_trip, host, peer)
                await changed.wait()

    async def _probe_round_trip(self, host: IHost, peer: str) -> None:
        opened = trio.current_time()
        await trio.sleep(_RTT_PROBE_AT_S[0])
        if peer not in self.connected_peers():
            return  # gone already: a probe never dials
        with trio.move_on_after(_RTT_PROBE_TIMEOUT_S):
            try:
                stream = await host.new_stream(ID.from_base58(peer), [_PING_PROTOCOL])
            except Exception as exc:  # trap 7: a refusal or a gone peer ends the probe
                log.debug("round-trip probe of %s: %s", peer, exc)
                return
            try:
                for at in _RTT_PROBE_AT_S:
                    await trio.sleep_until(opened + at)
                    payload = secrets.token_bytes(_PING_BYTES)
                    start = trio.current_time()
                    await stream.write(payload)
                    if await read_exactly(stream, _PING_BYTES) != payload:
                        break
                    sample = trio.current_time() - start
                    if peer not in self.connected_peers():
                        break  # gone meanwhile (_probe_round_trips forgot it)
                    self._rtt_min[peer] = min(sample, self._rtt_min.get(peer, math.inf))
            except Exception as exc:  # trap 7: a reset or a closed stream ends the probe
                log.debug("round-trip probe of %s: %s", peer, exc)
            finally:
                with trio.CancelScope(shield=True) as scope, contextlib.suppress(Exception):
                    scope.deadline = trio.current_time() + _STREAM_CLOSE_TIMEOUT_S
                    await stream.reset()

    def stats(self) -> dict[str, int]:
        """Counters since construction, plus the ``peers_connected`` gauge."""
        out = dict(self._stats)
        out["peers_connected"] = len(self.connected_peers())
        out["inbound_streams_open"] = self._guard.open_streams()
        out["dht_routing_table"] = self._dht.routing_table.size() if self._dht is not None else 0
        return out

    # --- registration (before run) --------------------------------------------------------

    def add_validator(self, topic: str, validator: Validator) -> None:
        """Subscribe to ``topic`` at start; ``validator`` sees each unique message once."""
        if self._running:
            raise LocalProtocolError("add_validator must be called before run()", reason="misuse")
        if topic in self._validators:
            raise LocalProtocolError(f"topic {topic!r} already has a validator", reason="misuse")
        self._validators[topic] = validator

    def on_peer_connected(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (synchronously, must not block) whenever a connection opens."""
        self._watcher.on_connected.append(callback)

    def set_address_book(self, lookup: Callable[[str], Sequence[str]]) -> None:
        """Where to find the addresses a peer announced for itself outside libp2p (the daemon
        passes its peer table: each peer's signed advert lists them), for a peer we must
        open a stream to while libp2p's peer store knows no way to it. That is how a peer
        behind a NAT, which no DHT lookup returns, is reached through its relay."""
        self._address_book = lookup

    def _addrs_announced_by(self, peer: ID) -> list[multiaddr.Multiaddr]:
        """What the address book says for ``peer``: at most 16 parseable addresses that name
        ``peer`` itself (a peer can only speak for itself), without the ``/p2p/`` suffix
        for direct ones."""
        try:
            announced = list(self._address_book(peer.to_base58()))[:16]
        except Exception:
            log.exception("the address book raised")
            return []
        suffix = f"/p2p/{peer.to_base58()}"
        out: list[multiaddr.Multiaddr] = []
        for text in announced:
            if not isinstance(text, str) or not text.endswith(suffix):
                continue
            try:
                addr = multiaddr.Multiaddr(text if "/p2p-circuit" in text else text[: -len(suffix)])
            except Exception:
                continue
            out.append(addr)
        return out

    def add_stream_handler(self, protocol_id: str, handler: StreamHandler) -> None:
        if self._running:
            raise LocalProtocolError("add_stream_handler must be called before run()", reason="misuse")
        if protocol_id in self._handlers:
            raise LocalProtocolError(f"protocol {protocol_id!r} already has a handler", reason="misuse")
        self._handlers[protocol_id] = handler

    # --- lifecycle ------------------------------------------------------------------------

    def _build_host(self) -> IHost:
        cfg = self._config
        noise_key = create_new_x25519_key_pair().private_key
        host = new_host(
            key_pair=self._key_pair,
            # trap 1: Noise only; new_host() would otherwise also offer TLS, SECIO, plaintext.
            sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(self._key_pair, noise_privkey=noise_key)},
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
            listen_addrs=self._listen,
            enable_mDNS=cfg.mdns,
            # trap 2: one connection per peer also ends happy-eyeballs after the first success.
            connection_config=ConnectionConfig(max_connections_per_peer=1, dial_timeout=_DIAL_TIMEOUT_S),
            # trap 11: explicit limits far above any devnet; no circuit breaker or "graceful
            # degradation" that could silently lower them.
            resource_manager=ResourceManager(
                limits=ResourceLimits(max_connections=1024, max_streams=16_384),
                enable_circuit_breaker=False,
                enable_graceful_degradation=False,
            ),
            addrs_factory=self._announced if self._announce or self._relays else _advertised_addrs,
            # Observed addresses of outbound TCP connections are ephemeral ports nobody can dial.
            disable_identify_address_discovery=True,
        )
        network = host.get_network()
        # trap 15: we own the retry/backoff policy (bootstrap loop, discovery loop).
        if hasattr(network, "retry_config"):
            network.retry_config = RetryConfig(max_retries=0)
        network.register_notifee(self._watcher)
        self._handshakes.install(network)
        # trap 24: one round trip per new stream, not two.
        cast(Any, host).multiselect_client = _PipelinedMultiselectClient()
        self._install_circuit_addrs(host)
        return host

    def _announced(self, _candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        # Behind a NAT (relays set) the listen addresses are private: peers learn the
        # configured ones, if any, and our circuit addresses (_install_circuit_addrs).
        return list(self._announce)

    def _install_circuit_addrs(self, host: IHost) -> None:
        """trap 29: ``BasicHost.get_addrs`` cuts each address the addrs factory returns at its
        first ``/p2p/`` component to append our own ID, so a circuit address
        (``<relay>/p2p/<relay id>/p2p-circuit``) came out as the relay's own address under our
        ID, which reaches the relay and fails its handshake. Identify, the signed peer record
        and our adverts all read ``get_addrs``; the circuit addresses are appended after
        that cut instead."""
        if not self._relays:
            return
        inner = host.get_addrs
        # <relay addr>/p2p/<relay id>/p2p-circuit/p2p/<our id>, for each relay.
        own = f"/p2p/{self._id.to_base58()}"
        circuits = [multiaddr.Multiaddr(f"{a}/p2p-circuit{own}") for a, _ in self._relays]

        def get_addrs() -> list[multiaddr.Multiaddr]:
            return [*inner(), *circuits]

        host.get_addrs = get_addrs  # type: ignore[method-assign]

    def _install_circuit_relay(self, host: IHost) -> CircuitV2Transport:
        """Circuit relay v2 (docs/design.md §10.7): every node can dial a ``/p2p-circuit``
        address; a relay serves the hop side; a node behind a NAT accepts circuits (stop).

        The handlers are registered here rather than by running py-libp2p's
        ``CircuitV2Protocol`` service, which would register them after (and over) our
        inbound guard; nothing else in that service is needed."""
        cfg = self._config
        proto = CircuitV2Protocol(host, limits=_RELAY_LIMITS, allow_hop=cfg.relay_service)
        if cfg.relay_service:
            self._cap_reservations_per_source(host, proto)
            host.set_stream_handler(_HOP_PROTOCOL, proto._handle_hop_stream)
        if self._relays:
            # Only a node that asked a relay for a reservation accepts circuits.
            host.set_stream_handler(_STOP_PROTOCOL, proto._handle_stop_stream)
        roles = RelayRole.CLIENT
        if cfg.relay_service:
            roles |= RelayRole.HOP
        if self._relays:
            roles |= RelayRole.STOP
        return CircuitV2Transport(host, proto, RelayConfig(roles=roles, limits=_RELAY_LIMITS))

    def _cap_reservations_per_source(self, host: IHost, proto: CircuitV2Protocol) -> None:
        """A relay grants at most _RELAY_RESERVATIONS_PER_SOURCE reservations to peers
        connected from one source address; a new one beyond that is refused (RESOURCE_LIMIT)
        and counted (``relay_reservations_refused``), a refresh never is. A peer whose source
        cannot be told is refused: fail closed."""
        manager = proto.resource_manager
        inner = manager.can_accept_reservation
        stats = self._stats

        def source_of(peer: ID) -> str | None:
            for conn in host.get_network().get_connections(peer):
                source = _source_of_conn(conn)
                if source is not None:
                    return source
            return None

        def can_accept_reservation(peer_id: ID) -> bool:
            if not inner(peer_id):
                return False
            held = manager._reservations.get(peer_id)
            if held is not None and not held.is_expired():
                return True  # a refresh
            source = source_of(peer_id)
            same = sum(
                1
                for peer, r in list(manager._reservations.items())
                if not r.is_expired() and source is not None and source_of(peer) == source
            )
            if source is None or same >= _RELAY_RESERVATIONS_PER_SOURCE:
                stats["relay_reservations_refused"] += 1
                return False
            return True

        manager.can_accept_reservation = can_accept_reservation  # type: ignore[method-assign]

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, join gossip and the DHT, keep bootstrap peers connected; until cancelled.

        ``task_status.started()`` is called once the host listens, pubsub is ready and every
        validator's topic is subscribed. On exit (cancel or error) the host is closed
        explicitly (trap 8): no listener and no libp2p task outlives this call.
        """
        if self._running:
            raise LocalProtocolError("P2PNode.run() is already running", reason="misuse")
        self._running = True
        host = self._build_host()
        gossipsub = GossipSub(
            protocols=_GOSSIP_PROTOCOLS,
            # Resized to the network as peers come and go (_size_mesh).
            degree=_FULL_MESH_PEERS,
            degree_low=_FULL_MESH_PEERS,
            degree_high=_FULL_MESH_PEERS,
            # trap 3. (Typed int in libp2p; it is only ever passed to trio.sleep.)
            heartbeat_interval=cast(int, self._config.heartbeat_s),
            adaptive_gossip_enabled=False,
            gossip_window=_GOSSIP_WINDOW,
            # trap 4: per-neighbour limit off (it also throttles our own publishes);
            # _TokenBucket limits per origin.
            spam_protection_enabled=False,
        )
        # trap 21: py-libp2p 0.8.1 sends IHAVE to max(6, a quarter of the peers outside the
        # mesh) on every heartbeat, with no option; each is an RPC both ends pay for. Gossip
        # only repairs losses here (adverts are refreshed, the market retries, and our own
        # messages are flood-published), so one does.
        gossipsub._get_adaptive_gossip_peers_count = (  # type: ignore[method-assign]
            lambda topic, total_peers: max(0, min(total_peers, _GOSSIP_LAZY))
        )
        _install_flood_publish(gossipsub)
        _install_sparse_ihave(gossipsub)
        pubsub = Pubsub(
            host,
            gossipsub,
            strict_signing=True,
            seen_ttl=_SEEN_TTL_S,
            max_inbound_rpc_size=1 << 20,
        )
        # trap 7 for libp2p's own handler: pubsub's read loop lets a protobuf DecodeError
        # (one malformed RPC from any peer) escape and tear the whole host down.
        for gossip_protocol in gossipsub.get_protocols():
            host.set_stream_handler(gossip_protocol, self._guarded_pubsub_handler(pubsub))
        # Behind a NAT nobody can dial us for a lookup: a DHT client only.
        dht = KadDHT(host, DHTMode.CLIENT if self._relays else DHTMode.SERVER)
        self._relay_transport = self._install_circuit_relay(host)
        for topic in self._validators:
            pubsub.set_topic_validator(topic, self._libp2p_validator(topic), is_async_validator=True)
        for protocol_id, handler in self._handlers.items():
            host.set_stream_handler(TProtocol(protocol_id), self._stream_entry(handler))
        # Every inbound stream, libp2p's own protocols included, goes through the guard.
        handlers = host.get_mux().handlers
        for proto, fn in list(handlers.items()):
            if proto is not None and fn is not None:
                handlers[proto] = self._guard.wrap(str(proto), fn)
        self._only_dht_servers(dht)
        try:
            # Anything libp2p raises out of its services becomes a TransportError here.
            with _translate_errors("p2p node"):
                await self._serve(host, gossipsub, pubsub, dht, task_status)
        finally:
            self._host = self._pubsub = self._dht = None
            self._relay_transport = None
            self._reserved_on.clear()
            self._running = False
            await self._close_host(host)

    async def _serve(
        self,
        host: IHost,
        gossipsub: GossipSub,
        pubsub: Pubsub,
        dht: KadDHT,
        task_status: TaskStatus[None],
    ) -> None:
        async with trio.open_nursery() as nursery:
            # trap 5: pubsub (whose stream handler its constructor registered) runs, and our
            # topics are subscribed, before the host listens or dials anything; peers then
            # learn our topics from the very first pubsub hello.
            async with background_trio_service(pubsub), background_trio_service(gossipsub):
                await pubsub.wait_until_ready()
                _install_direct_push(pubsub, self._stats)
                for topic in self._validators:
                    nursery.start_soon(self._drain, await pubsub.subscribe(topic))
                async with host.run(listen_addrs=self._listen):
                    try:
                        async with background_trio_service(dht):
                            self._host, self._pubsub, self._dht = host, pubsub, dht
                            for addr in self._config.bootstrap:
                                nursery.start_soon(self._keep_connected, addr)
                            for addr, relay in self._relays:
                                if addr not in self._config.bootstrap:
                                    nursery.start_soon(self._keep_connected, addr)
                                nursery.start_soon(self._keep_reserved, relay)
                            nursery.start_soon(self._discovery_loop)
                            nursery.start_soon(self._size_mesh, gossipsub)
                            nursery.start_soon(self._probe_round_trips, host)
                            log.info("p2p node %s listening on %s", self.peer_id, self.listen_addrs())
                            task_status.started()
                            await trio.sleep_forever()
                    finally:
                        # trap 8, before host.run()'s own exit path runs.
                        await self._close_host(host)

    async def _size_mesh(self, gossipsub: GossipSub) -> None:
        """Keep the mesh degree fitted to the number of neighbours (:func:`_mesh_degrees`);
        the next gossipsub heartbeat grafts or prunes to it."""
        while True:
            changed = self._watcher.changed
            host = self._host
            peers = len(host.get_connected_peers()) if host is not None else 0
            d, low, high = _mesh_degrees(peers)
            if (gossipsub.degree, gossipsub.degree_low, gossipsub.degree_high) != (d, low, high):
                gossipsub.degree, gossipsub.degree_low, gossipsub.degree_high = d, low, high
                # Read instead of degree_low/high when adaptive gossip is on (it is off, trap 3).
                gossipsub.adaptive_degree_low, gossipsub.adaptive_degree_high = low, high
                self._stats["mesh_resized"] += 1
            with trio.move_on_after(_MESH_RESIZE_S):
                await changed.wait()

    @staticmethod
    async def _close_host(host: IHost) -> None:
        # trap 8: leaving host.run() leaves the TCP listener (a trio *system* task) accepting.
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + _CLOSE_TIMEOUT_S
            try:
                await host.close()
            except Exception as exc:
                log.warning("closing the libp2p host failed: %r", exc)
        if scope.cancelled_caught:
            log.warning("closing the libp2p host took longer than %.0f s", _CLOSE_TIMEOUT_S)

    def _require(self) -> tuple[IHost, Pubsub, KadDHT]:
        if self._host is None or self._pubsub is None or self._dht is None:
            raise TransportError("p2p node is not running", reason="not_running")
        return self._host, self._pubsub, self._dht

    # --- dialling -------------------------------------------------------------------------

    async def connect(self, multiaddr: str) -> str:
        """Dial a full ``/…/p2p/<id>`` multiaddr; returns the peer ID.

        Raises LocalProtocolError for a malformed address or our own ID, TransportError
        if the peer cannot be reached.
        """
        info = _parse_p2p_addr(multiaddr)
        if info.peer_id == self._id:
            raise LocalProtocolError("refusing to dial ourselves", reason="self_dial")
        await self._dial(info)
        self._discovery_kick.set()  # the new neighbour may know peers we do not
        return info.peer_id.to_base58()

    async def _dial(self, info: PeerInfo) -> None:
        """Connect to ``info.peer_id``: its direct addresses first, then, if none answers,
        its ``/p2p-circuit`` addresses through their relays (docs/design.md §10.7).
        libp2p's swarm dials only direct ones (a circuit address goes through the circuit
        transport), so a peer known only by circuit addresses is dialled here."""
        host, _, _ = self._require()
        network = host.get_network()
        # trap 15: without this, a peer that failed once is refused for 60 s.
        negative_cache = getattr(network, "_negative_peer_cache", None)
        if negative_cache is not None:
            negative_cache.evict(str(info.peer_id))
        direct = [a for a in info.addrs if not _is_circuit(a)]
        circuits = [_circuit_to(a, info.peer_id) for a in info.addrs if _is_circuit(a)]
        try:
            if direct or not circuits:
                try:
                    with _translate_errors(f"dial {info.peer_id}"):
                        with trio.fail_after(_DIAL_TIMEOUT_S):
                            await host.connect(PeerInfo(info.peer_id, direct))
                except TransportError:
                    if not circuits:
                        raise
            if not network.get_connections(info.peer_id) and circuits:
                await self._dial_circuits(info.peer_id, circuits)
            # trap 11: connect() can "succeed" while the resource manager drops the connection.
            if not network.get_connections(info.peer_id):
                raise TransportError(f"connection to {info.peer_id} was dropped", reason="dropped")
        except TransportError:
            self._stats["dials_failed"] += 1
            raise
        self._stats["dials_ok"] += 1
        # connect() filed the addresses for libp2p's fixed 120 s; ours is configurable.
        with contextlib.suppress(Exception):
            host.get_peerstore().add_addrs(
                info.peer_id, info.addrs, max(1, round(self._config.peer_addr_ttl_s))
            )

    async def _dial_circuits(self, peer: ID, circuits: list[multiaddr.Multiaddr]) -> None:
        """Try each circuit address in turn; TransportError when none gives a connection."""
        host, _, _ = self._require()
        transport = self._relay_transport
        if transport is None:
            raise TransportError("p2p node is not running", reason="not_running")
        last: TransportError | None = None
        for addr in circuits:
            try:
                relay_addr, _ = transport.parse_circuit_ma(addr)
                relay = info_from_p2p_addr(relay_addr)
            except Exception:
                last = TransportError(f"not a circuit address: {addr}", reason="bad_multiaddr")
                continue
            if relay.peer_id == self._id:
                continue  # we are that relay: the peer reaches us, not we it, through ourselves
            if relay.addrs:
                with contextlib.suppress(Exception):
                    host.get_peerstore().add_addrs(
                        relay.peer_id, relay.addrs, max(1, round(self._config.peer_addr_ttl_s))
                    )
            try:
                with _translate_errors(f"dial {peer} through relay {relay.peer_id}"):
                    with trio.fail_after(_DIAL_TIMEOUT_S):
                        await transport.dial(addr)
            except TransportError as exc:
                last = exc
                continue
            self._stats["dials_relayed"] += 1
            return
        raise last or TransportError(f"no relay reaches {peer}", reason="unreachable")

    async def _keep_reserved(self, relay: PeerInfo) -> None:
        """Behind a NAT: hold a reservation at ``relay`` (circuit relay v2's RESERVE), so that
        peers can reach us through it. Reserves on every new connection to the relay (a
        relay that restarted has forgotten us) and before the reservation runs out; the
        connection itself is kept by _keep_connected."""
        while True:
            changed = self._watcher.changed
            host = self._host
            transport = self._relay_transport
            if host is not None and transport is not None:
                conns = host.get_network().get_connections(relay.peer_id)
                conn = conns[0] if conns else None
                expires = transport._reservations.get(relay.peer_id, 0)
                due = expires - time.time() < _RESERVATION_MARGIN_S
                if conn is not None and (due or self._reserved_on.get(relay.peer_id) is not conn):
                    if await self._reserve(host, transport, relay.peer_id):
                        self._reserved_on[relay.peer_id] = conn
                    else:
                        self._reserved_on.pop(relay.peer_id, None)
            with trio.move_on_after(_RESERVATION_CHECK_S):
                await changed.wait()

    async def _reserve(self, host: IHost, transport: CircuitV2Transport, relay: ID) -> bool:
        try:
            with trio.fail_after(_STREAM_OPEN_TIMEOUT_S):
                stream = await host.new_stream(relay, [_HOP_PROTOCOL])
            try:
                # Waits at most libp2p's STREAM_READ_TIMEOUT for the answer; logs and
                # returns False on any failure.
                ok = await transport._make_reservation(stream, relay)
            finally:
                with contextlib.suppress(Exception):
                    await stream.close()
        except Exception as exc:
            log.debug("reservation at relay %s failed: %r", relay, exc)
            ok = False
        if ok:
            self._stats["relay_reservations"] += 1
            log.info("reserved a circuit slot at relay %s", relay)
        else:
            self._stats["relay_reservations_failed"] += 1
        return ok

    def _known_addrs(self, peer: ID) -> list[multiaddr.Multiaddr]:
        """The peer store's live addresses of ``peer``; [] when it has none.

        py-libp2p raises PeerStoreError ("peer ID is expired") for a peer whose addresses
        have lapsed and ("peer ID not found") for one it never knew. Called unguarded from
        discovery, that ended the p2p task and with it every daemon a departed peer had
        touched (issue 11).
        """
        if self._host is None:
            return []
        try:
            return list(self._host.get_peerstore().addrs(peer))
        except Exception:
            return []

    def _forget(self, peer: ID) -> None:
        """Drop a peer that does not answer from the routing table, so we stop handing it out."""
        dht = self._dht
        if dht is not None and dht.routing_table.peer_in_table(peer):
            with contextlib.suppress(Exception):
                dht.routing_table.remove_peer(peer)
                self._stats["dht_peers_forgotten"] += 1

    def _serves_dht(self, peer: ID) -> bool:
        """Whether identify says ``peer`` serves Kademlia (the kad-dht spec admits only
        server-mode peers to a routing table). Unknown counts as no."""
        if self._host is None:
            return False
        try:
            protocols = self._host.get_peerstore().get_protocols(peer)
        except Exception:
            return False
        return _KAD_PROTOCOL in {str(p) for p in protocols or ()}

    def _only_dht_servers(self, dht: KadDHT) -> None:
        """Make the DHT's own inbound path check server mode too.

        py-libp2p 0.8.1 adds every peer that opens a DHT stream to its routing table
        (``add_peer(..., skip_server_mode_check=True)``), so DHT *clients* (a js-libp2p
        node in client mode, a browser) were handed out as servers, and dials to them
        failed once they left (issue 11).
        """
        inner = dht.add_peer

        async def add_peer(peer_id: ID, *, skip_server_mode_check: bool = False) -> bool:
            if not self._serves_dht(peer_id):
                self._stats["dht_peers_refused"] += 1
                return False
            return await inner(peer_id, skip_server_mode_check=True)

        dht.add_peer = add_peer  # type: ignore[method-assign]

    def _is_connected(self, peer: ID) -> bool:
        return self._host is not None and bool(self._host.get_network().get_connections(peer))

    async def _keep_connected(self, addr: str) -> None:
        """Keep one bootstrap peer connected: redial with exponential backoff while it is down."""
        try:
            info = _parse_p2p_addr(addr)
        except LocalProtocolError as exc:
            log.error("ignoring bootstrap address %r: %s", addr, exc)
            return
        if info.peer_id == self._id:
            return  # a shared bootstrap list may name ourselves
        initial, ceiling = self._config.dial_backoff_initial_s, self._config.dial_backoff_max_s
        delay = initial
        up_since: float | None = None
        while True:
            if self._is_connected(info.peer_id):
                if up_since is None:
                    up_since = trio.current_time()
                changed = self._watcher.changed
                # Event-driven, with a periodic re-check as a guard against a missed event.
                with trio.move_on_after(5.0):
                    await changed.wait()
                continue
            if up_since is not None:
                # It dropped. After a stable connection redial at once; a connection that
                # keeps dropping right after it is made (e.g. the peer refuses us) backs off.
                stable = trio.current_time() - up_since >= _STABLE_CONNECTION_S
                up_since = None
                if stable:
                    delay = initial
                else:
                    await self._backoff_sleep(delay)
                    delay = min(delay * 2, ceiling)
            try:
                await self._dial(info)
                log.info("connected to bootstrap peer %s", info.peer_id)
                self._discovery_kick.set()
                continue
            except TransportError as exc:
                log.debug("bootstrap peer %s unreachable (%s); retry in %.1f s", info.peer_id, exc, delay)
            await self._backoff_sleep(delay)
            delay = min(delay * 2, ceiling)

    @staticmethod
    async def _backoff_sleep(delay: float) -> None:
        # Jitter so peers that lost the same bootstrap node do not redial in lockstep.
        await trio.sleep(delay * random.uniform(0.8, 1.2))

    async def _discovery_loop(self) -> None:
        """Kademlia self-lookups; dial every peer found so small networks become a full mesh.

        A lookup runs as soon as we (re)connect to a bootstrap peer or connect() is called,
        then after 2, 4, 8 ... s (four times longer after a round that connected nobody new),
        settling at once every 5 minutes. Two peers joining at once
        through the same bootstrap peer still find each other on their first lookups: the
        bootstrap peer adds a querier to its routing table before answering it, so at least
        one of the two answers names the other peer. The repeats catch anything missed.
        """
        delay = _DISCOVERY_MAX_S
        newly = 0
        while True:
            kick = self._discovery_kick
            with trio.move_on_after(delay):
                await kick.wait()
            if kick.is_set():
                self._discovery_kick = trio.Event()
                delay = _DISCOVERY_REPEAT_S
            else:
                # A round that found nobody new backs off twice as fast: on an idle, already
                # meshed network the lookups (each ~15 ms of CPU per neighbour, trap 19) were
                # most of a daemon's CPU in its first minutes (issue 10).
                delay = min(delay * (2 if newly else 4), _DISCOVERY_MAX_S)
            newly = 0
            try:
                newly = await self._discover_once()
            except Exception as exc:
                # Discovery is best effort. Whatever one peer's answer or one dial does,
                # it must not end the p2p task (issue 11: it took whole devnets down).
                self._stats["discovery_errors"] += 1
                log.warning("DHT discovery round failed: %r", exc)

    async def _discover_once(self) -> int:
        host, _, dht = self._require()
        connected = host.get_connected_peers()
        if not connected:
            return 0
        for peer in connected:
            # Peers only enter the routing table when they query us or we query them;
            # make sure direct neighbours that serve the DHT are there to start from.
            if not dht.routing_table.peer_in_table(peer) and self._serves_dht(peer):
                with contextlib.suppress(Exception):
                    await dht.add_peer(peer)
        self._stats["discovery_lookups"] += 1
        candidates: list[ID] = []
        with trio.move_on_after(_DISCOVERY_LOOKUP_TIMEOUT_S):
            try:
                candidates = await dht.peer_routing.find_closest_peers_network(self._id.to_bytes())
            except Exception as exc:  # discovery is best effort; never take the node down
                log.debug("DHT lookup failed: %r", exc)
        to_dial = [p for p in candidates if p != self._id and not self._is_connected(p)]
        room = max(0, _DISCOVERY_TARGET_PEERS - len(host.get_connected_peers()))
        to_dial = to_dial[:room]
        if not to_dial:
            return 0
        newly = 0
        limiter = trio.CapacityLimiter(_DISCOVERY_MAX_DIALS)

        async def dial_one(peer: ID) -> None:
            nonlocal newly
            async with limiter:
                addrs = self._known_addrs(peer)
                if not addrs:
                    # A departed peer whose addresses lapsed: nothing to dial, and nobody
                    # should be told about it.
                    self._forget(peer)
                    return
                try:
                    await self._dial(PeerInfo(peer, addrs))
                    newly += 1
                except TransportError as exc:
                    log.debug("discovered peer %s unreachable: %s", peer, exc)
                    self._forget(peer)

        async with trio.open_nursery() as nursery:
            for peer in to_dial:
                nursery.start_soon(dial_one, peer)
        if newly:
            log.info("DHT discovery connected %d new peer(s)", newly)
        return newly

    # --- gossip ---------------------------------------------------------------------------

    async def publish(self, topic: str, data: bytes) -> None:
        """Sign and gossip ``data`` on ``topic``. Our own messages skip our validators."""
        if len(data) > self._max_gossip:
            raise LocalProtocolError(
                f"gossip payload of {len(data)} bytes exceeds {self._max_gossip}", reason="oversized"
            )
        _, pubsub, _ = self._require()
        with _translate_errors(f"publish on {topic}"):
            await pubsub.publish(topic, bytes(data))
        self._stats["gossip_published"] += 1

    async def flush(self, timeout_s: float) -> bool:
        """Wait, at most ``timeout_s``, until libp2p has taken every gossip RPC out of its
        per-neighbour outbound queues (it publishes into them and writes from a task per
        neighbour); True if they emptied. For a last message before closing the host
        (peerd/adverts.py leave), which would otherwise drop what is still queued."""
        pubsub = self._pubsub
        if pubsub is None:
            return True
        with trio.move_on_after(timeout_s):
            # peer_queues: py-libp2p 0.8.1's per-neighbour RpcQueue (trap 22).
            while any(len(q) for q in list(getattr(pubsub, "peer_queues", {}).values())):
                await trio.sleep(_FLUSH_POLL_S)
            # A sending task pops an RPC before it writes it: let the last writes finish.
            await trio.sleep(_FLUSH_POLL_S)
            return True
        return False

    async def _drain(self, subscription: Any) -> None:
        # trap 6: libp2p copies every accepted message into a 32-slot queue per topic; we
        # consume gossip through validators, so this only keeps the queue empty.
        async for _ in subscription:
            pass

    def _libp2p_validator(self, topic: str) -> Callable[[ID, rpc_pb2.Message], Awaitable[bool]]:
        async def validate(forwarder: ID, msg: rpc_pb2.Message) -> bool:
            return await self._validate(topic, forwarder, msg)

        return validate

    async def _validate(self, topic: str, forwarder: ID, msg: rpc_pb2.Message) -> bool:
        # libp2p has already checked the strict signature against msg.from_id when it calls us.
        origin = ID(msg.from_id)
        if origin == self._id:
            # Our own publish is valid; our own message coming back from elsewhere is not
            # new (libp2p drops it after validation anyway). Neither reaches the validator.
            return forwarder == self._id
        pubsub = self._pubsub
        if pubsub is None:
            return False
        key = (topic, pubsub.get_message_id(msg))
        now = time.monotonic()
        verdict = self._verdicts.get(key)
        if verdict is not None and verdict.expires > now:
            await verdict.done.wait()
            return verdict.result
        verdict = _Verdict(now + _VERDICT_TTL_S)
        self._remember(key, verdict, now)
        try:
            judged = await self._judge(topic, forwarder, origin, msg, now)
            verdict.result = bool(judged)
            if judged is None:
                # Refused because of the neighbour that relayed it, not because of the
                # message: another neighbour's copy may still be judged on its merits.
                self._verdicts.pop(key, None)
        finally:
            # Also on cancellation (libp2p's 5 s validation timeout): waiters then see the
            # default result, a reject, instead of waiting forever.
            verdict.done.set()
        self._stats["gossip_accepted" if verdict.result else "gossip_rejected"] += 1
        return verdict.result

    async def _judge(
        self, topic: str, forwarder: ID, origin: ID, msg: rpc_pb2.Message, now: float
    ) -> bool | None:
        """The validator's verdict; None when the relaying neighbour is over its limit."""
        if len(msg.data) > self._max_gossip:
            self._stats["gossip_oversized"] += 1
            return False
        if not self._take_token(topic, msg.from_id, now):
            self._stats["gossip_rate_limited"] += 1
            return False
        if forwarder != origin and not self._take_relay_token(topic, forwarder.to_bytes(), now):
            self._stats["gossip_relay_limited"] += 1
            return None
        message = GossipMessage(
            topic=topic, data=bytes(msg.data), origin=origin.to_base58(), received_from=forwarder.to_base58()
        )
        validator = self._validators[topic]
        try:
            return bool(await validator(message))
        except trio.Cancelled:
            self._stats["validator_timeouts"] += 1
            raise
        except Exception:
            self._stats["validator_errors"] += 1
            log.exception("validator for %s raised on a message from %s; rejecting", topic, message.origin)
            return False

    def _remember(self, key: tuple[str, bytes], verdict: _Verdict, now: float) -> None:
        self._verdicts[key] = verdict
        self._verdicts.move_to_end(key)
        # Entries are inserted in time order, so expired ones are at the front.
        while self._verdicts:
            oldest_key, oldest = next(iter(self._verdicts.items()))
            if oldest.expires > now and len(self._verdicts) <= _VERDICT_CACHE_MAX:
                break
            del self._verdicts[oldest_key]

    def _take_token(self, topic: str, origin: bytes, now: float) -> bool:
        return _take(self._buckets, (topic, origin), self._config.max_msgs_per_origin_per_s, now)

    def _take_relay_token(self, topic: str, forwarder: bytes, now: float) -> bool:
        rate = self._config.max_relayed_per_neighbour_per_s
        return _take(self._relay_buckets, (topic, forwarder), rate, now)

    def _guarded_pubsub_handler(self, pubsub: Pubsub) -> Callable[[INetStream], Awaitable[None]]:
        async def handler(stream: INetStream) -> None:
            try:
                await pubsub.stream_handler(stream)
            except Exception as exc:
                self._stats["gossip_stream_errors"] = self._stats.get("gossip_stream_errors", 0) + 1
                log.debug("dropping a pubsub stream that sent garbage: %r", exc)
                with contextlib.suppress(Exception):
                    await stream.reset()

        return handler

    # --- streams --------------------------------------------------------------------------

    def _stream_entry(self, handler: StreamHandler) -> Callable[[INetStream], Awaitable[None]]:
        async def entry(stream: INetStream) -> None:
            await self._serve_stream(handler, stream)

        return entry

    async def _serve_stream(self, handler: StreamHandler, stream: INetStream) -> None:
        # trap 7: nothing a handler (or a misbehaving remote) raises may reach libp2p.
        try:
            remote = stream.muxed_conn.peer_id.to_base58()
        except Exception:
            remote = "?"
        frames = _Libp2pFrameStream(stream, remote)
        self._stats["streams_accepted"] += 1
        try:
            await handler(frames)
        except TransportError as exc:
            log.debug("stream %s from %s ended: %s", stream.get_protocol(), remote, exc)
        except Exception:
            self._stats["handler_errors"] += 1
            log.exception("handler for %s raised on a stream from %s", stream.get_protocol(), remote)
        finally:
            await frames.aclose()

    async def open_stream(self, peer_id: str, protocol_id: str) -> FrameStream:
        """Open a framed stream to ``peer_id`` (dialling it if needed). TransportError on failure."""
        peer = _parse_peer_id(peer_id)
        host, _, _ = self._require()
        if not self._is_connected(peer):
            addrs = self._known_addrs(peer)
            if not addrs or any(_is_circuit(a) for a in addrs):
                # libp2p's own dial in new_stream would try only the peer store's direct
                # addresses; a peer behind a NAT has only circuit ones, and may be known
                # only from its advert.
                addrs += [a for a in self._addrs_announced_by(peer) if a not in addrs]
                if addrs:
                    await self._dial(PeerInfo(peer, addrs))
        with _translate_errors(f"open {protocol_id} to {peer_id}"):
            with trio.fail_after(_STREAM_OPEN_TIMEOUT_S):
                stream = await host.new_stream(peer, [TProtocol(protocol_id)])
        self._stats["streams_opened"] += 1
        return _Libp2pFrameStream(stream, peer_id)
