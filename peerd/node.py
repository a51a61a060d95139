"""The parts of one running daemon, wired together, and the few helpers every
protocol role needs: sealing messages with fresh sequence numbers, publishing on the
task topic, and fetching blobs from a peer.

Roles (``submitter``, ``contractor``, ``rounds``) receive a :class:`Node` instead of a
dozen constructor arguments; tests build one with fakes. The node holds no nursery: each
role spawns into its own (peerd/scope.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from peerd.blobs import BlobStore
from peerd.counters import Counters
from peerd.inbox import Inbox, wall_ms
from peerd.seqstore import SequenceStore
from peerd.store import Store
from protocol.envelope import Signed, Signer
from protocol.errors import ProtocolError
from protocol.messages import Message

if TYPE_CHECKING:
    from peerd.config import Config
    from peerd.executor import WorkerPool
    from peerd.p2p import P2PNode
    from peerd.peertable import PeerTable

log = logging.getLogger(__name__)

TASKS_TOPIC = "peerd/tasks/2"
BID_PROTOCOL = "/peerd/bid/2.0.0"
RESULT_PROTOCOL = "/peerd/result/2.0.0"

#: The largest gossip payload this daemon sends or accepts: the one limit a gossiped message
#: must fit (passed to the p2p layer as its cap). Below the 64 KiB envelope limit (SPEC §5) on
#: purpose: with pubsub's own fields a 64 KiB payload spans two yamux frames, and py-libp2p
#: 0.8.1 can interleave another write between them (tests/integration/hostile.py).
MAX_GOSSIP_BYTES = 60 * 1024
#: How much a re-announce of the same task may outgrow the first (a larger ``seq`` takes up to
#: 8 more bytes in msgpack; the other fields keep their sizes), so a task accepted at submit
#: can always be re-announced.
ANNOUNCE_SLACK = 16

M = TypeVar("M", bound=Message)


def gossip_too_large(raw: bytes, *, slack: int = 0) -> str | None:
    """Why ``raw`` cannot be gossiped (its size against :data:`MAX_GOSSIP_BYTES`), or None."""
    if len(raw) + slack > MAX_GOSSIP_BYTES:
        return f"{len(raw)} bytes signed, and one gossip message carries at most {MAX_GOSSIP_BYTES - slack}"
    return None


@dataclass
class Node:
    config: Config
    signer: Signer
    seq: SequenceStore
    counters: Counters
    inbox: Inbox
    store: Store
    blobs: BlobStore
    p2p: P2PNode
    pool: WorkerPool
    table: PeerTable
    #: Calibrated base capacity C⁰ (GFLOP/s) as advertised.
    c0: float = 0.0
    #: Shards awarded to us and not finished (some may be waiting between rounds).
    active_shards: int = 0
    #: Called when this node's load or capacity changed (re-advertise at once): the advert
    #: service's ``poke``, given when the node is built.
    poke_advert: Callable[[], None] = lambda: None
    #: Per-task watchers (RPC task.watch) notified on every state change.
    watchers: dict[str, set[trio.MemorySendChannel[dict[str, Any]]]] = field(default_factory=dict)
    #: Told of every message this node publishes on the task topic: our own messages skip
    #: our validators (the task bus), so our own machines learn of them here (our submitter
    #: of our contractor's leases).
    on_gossip: list[Callable[[bytes], None]] = field(default_factory=list)

    @property
    def peer_id(self) -> str:
        return self.signer.peer_id

    def load(self) -> float:
        """L for adverts and bids: busy worker slots, or awarded shards, per slot."""
        return max(self.pool.load(), self.active_shards / max(1, self.pool.slots()))

    def seal(self, cls: type[M], *, ttl_ms: int, **fields: Any) -> tuple[bytes, Signed]:
        """Build, sign and self-admit a message. Returns (envelope bytes, verified form)."""
        now = wall_ms()
        msg = cls(seq=self.seq.next(), issued_at=now, expires_at=now + min(ttl_ms, cls.MAX_TTL_MS), **fields)
        raw = self.signer.seal(msg)
        signed = self.inbox.admit(raw, sender=self.peer_id, kinds=frozenset({cls.KIND}))
        assert signed is not None, "our own message failed verification"
        return raw, signed

    async def gossip(self, raw: bytes) -> None:
        if gossip_too_large(raw):
            # A bug, not a network condition: what we sign for the topic is sized to fit
            # (the announce is checked at submit). Loud, and counted apart from transport loss.
            self.counters.inc("tasks.publish_oversized")
            log.error(
                "not publishing a %d-byte message: above the %d-byte gossip cap", len(raw), MAX_GOSSIP_BYTES
            )
            return
        for hook in self.on_gossip:
            hook(raw)
        try:
            await self.p2p.publish(TASKS_TOPIC, raw)
        except Exception as exc:  # publishing is best effort; callers have their own retries
            self.counters.inc("tasks.publish_failed")
            log.warning("publish on %s failed: %s", TASKS_TOPIC, exc)

    async def fetch_blob(self, peer_id: str, digest: str, *, max_bytes: int | None = None) -> Path:
        """Fetch a content-addressed blob from ``peer_id`` (or return the local copy)."""
        from peerd import blobxfer

        if self.blobs.has(digest):
            return self.blobs.path(digest)
        limit = max_bytes if max_bytes is not None else self.config.policy.max_blob_mb << 20

        async def open_stream() -> Any:
            return await self.p2p.open_stream(peer_id, blobxfer.PROTOCOL_ID)

        return await blobxfer.fetch_blob(open_stream, digest, self.blobs, max_bytes=limit)

    async def fetch_from_any(
        self,
        digest: str,
        peers: Sequence[str],
        *,
        max_bytes: int | None = None,
        passes: int = 1,
        pause_s: float = 1.0,
        give_up: Callable[[str, ProtocolError], bool] | None = None,
    ) -> Path:
        """The local copy, or the blob fetched from the first of ``peers`` that serves it
        (:func:`peerd.blobxfer.fetch_from_any`; ourselves and repeats are skipped, and peers
        reached only through a relay are tried last)."""
        from peerd import blobxfer

        if self.blobs.has(digest):
            return self.blobs.path(digest)
        order = [p for p in dict.fromkeys(peers) if p != self.peer_id]
        # Peers reached only through a relay last (stable otherwise): a blob from any other
        # holder spares the relay's bandwidth and costs a third of the CPU (design.md §10.7).
        order.sort(key=self.p2p.relayed)

        async def one(peer: str) -> Path:
            return await self.fetch_blob(peer, digest, max_bytes=max_bytes)

        return await blobxfer.fetch_from_any(one, order, passes=passes, pause_s=pause_s, give_up=give_up)

    def emit(self, task_id: str, event: dict[str, Any]) -> None:
        """Push an event to every RPC watcher of ``task_id`` (never blocks the caller)."""
        for ch in list(self.watchers.get(task_id, ())):
            try:
                ch.send_nowait(event)
            except trio.WouldBlock:
                self.counters.inc("rpc.watch_dropped")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.watchers[task_id].discard(ch)
