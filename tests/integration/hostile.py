"""A hostile peer for integration tests, and helpers that forge protocol messages.

:class:`HostilePeer` is a real libp2p node (``peerd.p2p.P2PNode``, the daemon's own
transport) with its own Ed25519 key, joined to a devnet from inside a trio test. It can
publish any bytes on ``peerd/adverts/2`` and ``peerd/tasks/2`` and open
``/peerd/bid/2.0.0`` streams. libp2p itself stays honest: the gossip ``from`` is always the
hostile peer's ID and carries a valid libp2p signature, so everything the tests exercise
is what peerd's own checks (``peerd.inbox``) must catch::

    async with HostilePeer.joined(net, victim) as evil:
        await evil.publish(ADVERTS, forged_bytes)
        await evil.expect_drop(net, victim, "bad_signature", forged_bytes)

The forging helpers build payloads and envelopes *by hand* (msgpack + Ed25519 over
``protocol.envelope.signing_bytes``), because the message constructors and
``Signer.seal`` refuse to build bad messages: they are what a compatible-but-malicious
implementation would send. :func:`sign_envelope` with default arguments produces exactly
the bytes ``Signer.seal`` would (a test checks that, so the forgeries differ from honest
messages only where they mean to).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peerd.p2p import P2PConfig, P2PNode
from peerd.streams import FrameStream
from protocol import PROTOCOL_VERSION, codec
from protocol.envelope import Signer, signing_bytes
from protocol.messages import Advert, Bid, Message

ADVERTS = "peerd/adverts/2"
TASKS = "peerd/tasks/2"
BID_PROTOCOL = "/peerd/bid/2.0.0"

_seq = itertools.count(int(time.time() * 1000))


def now_ms() -> int:
    return int(time.time() * 1000)


def next_seq() -> int:
    """Fresh sequence numbers, increasing like a real peer's (wall-clock based)."""
    return next(_seq)


# --- forging --------------------------------------------------------------------------------


def advert(
    *, ttl_ms: int = 60_000, seq: int | None = None, issued_at: int | None = None, **fields: Any
) -> Advert:
    """A plausible, valid advert (the constructor validates it); ``fields`` override any field."""
    issued = now_ms() if issued_at is None else issued_at
    base: dict[str, Any] = {
        "seq": next_seq() if seq is None else seq,
        "issued_at": issued,
        "expires_at": issued + ttl_ms,
        "c0": 42.0,
        "load": 0.0,
        "cpu": {"cores": 2, "model": "hostile cpu", "gflops": 42.0},
        "memory": {"total_mb": 4096, "available_mb": 2048},
        "gpus": [],
        "offer": {
            "cores": 2,
            "gpus": [],
            "memory_mb": 2048,
            "kinds": ["echo"],
            "draining": False,
            "slots": 1,
            "busy": 0,
        },
        "params": {"k": 0.2, "dc_min": 0.0, "dc_max": None},
        "addrs": [],
        "version": "0.1.0",
    }
    base.update(fields)
    return Advert(**base)


def bid(task_id: str = "ab" * 16, **fields: Any) -> Bid:
    t = now_ms()
    base: dict[str, Any] = {
        "seq": next_seq(),
        "issued_at": t,
        "expires_at": t + 60_000,
        "task_id": task_id,
        "c0": 10.0,
        "load": 0.0,
    }
    base.update(fields)
    return Bid(**base)


def wire(message: Message, **raw_fields: Any) -> dict[str, Any]:
    """The message's wire map with ``raw_fields`` replaced *without* validation (absurd values)."""
    out = message.to_wire()
    out.update(raw_fields)
    return out


def pack_payload(obj: dict[str, Any]) -> bytes:
    """Canonical msgpack of ``obj`` with no field validation at all."""
    return codec.pack(obj)


def sign_envelope(
    seed: bytes,
    payload: bytes,
    *,
    kind: str = "advert",
    version: int = PROTOCOL_VERSION,
    key: bytes | None = None,
    sig: bytes | None = None,
    canonical: bool = True,
) -> bytes:
    """An envelope around ``payload``, signed with ``seed`` over the domain-separated signing bytes.

    ``key`` replaces the public key written in the envelope (claim to be somebody else),
    ``sig`` replaces the signature, ``canonical=False`` packs the outer map with its keys in
    reverse order (valid msgpack, valid signature, but not peerd's single encoding).
    """
    private = Ed25519PrivateKey.from_private_bytes(seed)
    outer = {
        "key": key if key is not None else private.public_key().public_bytes_raw(),
        "payload": payload,
        "sig": sig if sig is not None else private.sign(signing_bytes(kind, version, payload)),
        "type": kind,
        "v": version,
    }
    if canonical:
        return codec.pack(outer)
    return msgpack.packb(dict(reversed(list(outer.items()))), use_bin_type=True)


def flip_signature_bit(raw: bytes) -> bytes:
    """The same envelope with one bit of its signature flipped (still canonical msgpack)."""
    outer = msgpack.unpackb(raw, raw=False)
    sig = bytearray(outer["sig"])
    sig[10] ^= 0x01
    outer["sig"] = bytes(sig)
    return codec.pack(outer)


def seal(seed: bytes, message: Message) -> bytes:
    return Signer(seed).seal(message)


# --- the peer -------------------------------------------------------------------------------


class HostilePeer:
    """A libp2p node with its own key that sends what it is told to (see the module doc)."""

    def __init__(self, seed: bytes | None = None, *, discover: bool = False) -> None:
        self.seed = seed if seed is not None else os.urandom(32)
        self.signer = Signer(self.seed)
        # Up to libp2p's own limit, above the daemons' 60 KiB gossip cap, so tests can send
        # what an honest peer never would.
        self.node = P2PNode(self.seed, P2PConfig(listen=("/ip4/127.0.0.1/tcp/0",), max_gossip_bytes=1 << 20))
        if not discover:
            # Only the peers a test connects it to: no DHT lookups, which would also keep
            # redialling the dead hostile peers of earlier tests that the daemons still know.
            self.node._discovery_loop = trio.sleep_forever  # type: ignore[method-assign]
        # The peer subscribes to nothing, so it publishes through gossipsub's fanout: every
        # message goes straight to the subscribed peers it is connected to, and it never
        # takes part in the mesh (GRAFT/PRUNE). When it did subscribe, py-libp2p 0.8.1's
        # GRAFT-flood rule could make it PRUNE the victim and both sides then back off each
        # other for 60 s, so its gossip reached nobody (a CI failure in
        # test_a_barrage_leaves_the_victim_serving). An attacker needs no mesh either:
        # whatever a connected peer publishes reaches the victim's validators. Not
        # subscribing also means it relays nothing: the only traffic it writes is what a
        # test tells it to send (py-libp2p 0.8.1 interleaves the yamux frames of concurrent
        # writes to one pubsub stream, so an RPC above ~64 KiB written while a relay was in
        # flight reached the victim corrupted).

    @property
    def peer_id(self) -> str:
        return self.signer.peer_id

    # -- joining ---------------------------------------------------------------------------
    @classmethod
    @asynccontextmanager
    async def joined(
        cls, net: Any, victim: int, *, seed: bytes | None = None, discover: bool = False
    ) -> AsyncIterator[HostilePeer]:
        """Run a hostile peer connected to devnet node ``victim`` whose gossip reaches it.

        ``net`` is a ``conftest.TestNet``. With ``discover`` the peer also finds and connects
        to the rest of the devnet through the DHT, like a real node. On exit its host is closed.
        """
        peer = cls(seed, discover=discover)
        async with trio.open_nursery() as nursery:
            await nursery.start(peer.node.run)
            info = await trio.to_thread.run_sync(net.info, victim)
            await peer.node.connect(info["listen_addrs"][0])
            await peer.wait_reaches(net, victim)
            yield peer
            nursery.cancel_scope.cancel()

    async def wait_reaches(self, net: Any, victim: int, *, timeout: float = 20.0) -> None:
        """Publish probes on both topics until ``victim`` has judged one of each.

        Until the victim's subscriptions have reached this peer, a fanout publish goes
        nowhere. A probe is a correctly signed message of a kind the topic does
        not carry, so the victim counts it as ``dropped.unexpected_kind`` and nothing else.
        """
        for topic, kind_of_probe in ((ADVERTS, "bid"), (TASKS, "advert")):
            deadline = trio.current_time() + timeout
            base = (await self.counters(net, victim)).get("dropped.unexpected_kind", 0)
            while True:
                probe = seal(self.seed, bid() if kind_of_probe == "bid" else advert())
                await self.publish(topic, probe)
                with trio.move_on_after(0.5):
                    while (await self.counters(net, victim)).get("dropped.unexpected_kind", 0) == base:
                        await trio.sleep(0.05)
                    break
                if trio.current_time() > deadline:
                    raise AssertionError(
                        f"gossip from the hostile peer never reached node {victim} on {topic}"
                    )

    # -- sending ---------------------------------------------------------------------------
    async def publish(self, topic: str, data: bytes) -> None:
        await self.node.publish(topic, data)

    async def open_bid_stream(self, peer_id: str) -> FrameStream:
        return await self.node.open_stream(peer_id, BID_PROTOCOL)

    async def send_raw(self, peer_id: str, protocol_id: str, data: bytes, *, linger: float = 0.3) -> None:
        """Open ``protocol_id`` to ``peer_id`` and write ``data`` as is, without peerd's framing
        (e.g. a corrupt protobuf on libp2p's own ``/meshsub/1.1.0``); then close the stream."""
        stream = await self.node.open_stream(peer_id, protocol_id)
        try:
            await stream._stream.write(data)  # type: ignore[attr-defined]
            await trio.sleep(linger)  # let the other side read it before the stream closes
        finally:
            await stream.aclose()

    # -- observing the victim --------------------------------------------------------------
    @staticmethod
    async def counters(net: Any, i: int) -> dict[str, int]:
        return dict(await trio.to_thread.run_sync(net.counters, i))

    @staticmethod
    async def peers(net: Any, i: int) -> dict[str, dict[str, Any]]:
        return dict(await trio.to_thread.run_sync(net.peers, i))

    async def expect_drop(
        self, net: Any, victim: int, reason: str, data: bytes, *, topic: str = ADVERTS, timeout: float = 10.0
    ) -> dict[str, int]:
        """Publish ``data`` once and wait until ``victim`` counts one more ``dropped.<reason>``.

        Returns the victim's counters after the drop. The message is published exactly once:
        a second copy would be a different test (the inbox dedupes by envelope hash).
        """
        name = f"dropped.{reason}"
        before = await self.counters(net, victim)
        await self.publish(topic, data)
        deadline = trio.current_time() + timeout
        while True:
            after = await self.counters(net, victim)
            if after.get(name, 0) > before.get(name, 0):
                return after
            if trio.current_time() > deadline:
                changed = {k: (before.get(k, 0), v) for k, v in after.items() if v != before.get(k, 0)}
                raise AssertionError(f"node {victim} never counted {name}; counters that changed: {changed}")
            await trio.sleep(0.05)
