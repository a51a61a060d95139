"""The simulated network: latency, loss, bandwidth, reordering, partitions, gossip.

Model (docs/simulation.md "Network model"):

* **Latency.** Each message's one-way latency is drawn independently from a log-normal
  distribution with median ``latency_ms`` and shape ``jitter``. Independent draws are what
  reorders messages: two messages on one link arrive in the order of their draws, not of
  their sending (libp2p gives no order across streams or gossip paths either).
* **Bandwidth.** Every peer has one uplink of ``bandwidth`` bytes/s, a FIFO: a message
  leaves when the ones queued before it have left (``size / bandwidth`` each), then
  travels for its latency. Blobs therefore queue behind blobs.
* **Loss.** Each delivery is lost with probability ``loss``. A lost direct message is
  reported to its sender as a failed exchange after ``stream_timeout`` (what a stream
  error or an exchange time-out looks like to a daemon); a lost gossip copy is silent.
* **Partitions.** While a partition holds, peers on different sides cannot reach each
  other: direct sends fail, gossip does not cross. A crashed peer reaches nobody.
* **Gossip.** A publish reaches every peer (``gossip="full"``, what gossipsub promises
  when the mesh is connected) or a random sample of ``sample`` peers
  (``gossip="sampled"``, the neighbourhood alternative of docs/simulation.md). Delivery
  takes ``hops`` mesh hops (``ceil(log_D N)`` for mesh degree D = ``mesh_degree``), each one
  a latency draw; the publisher's uplink sends D copies.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sim.engine import Engine


@dataclass(frozen=True)
class NetConfig:
    latency_ms: float = 40.0
    jitter: float = 0.5  # log-normal sigma; 0 = constant latency, no reordering
    loss: float = 0.0
    bandwidth: float = 12.5e6  # bytes/s per uplink (100 Mbit/s)
    gossip: str = "full"  # "full" | "sampled"
    sample: int = 16  # receivers per publish in "sampled" mode
    mesh_degree: int = 6  # gossipsub D
    stream_timeout: float = 10.0  # SPEC §8.2: the submitter allows 10 s for a bid exchange


@dataclass
class Partition:
    start: float
    end: float
    side: frozenset[int]  # the peers cut off from the rest


class Traffic:
    """Message and byte counts by kind; ``delivered`` counts receptions (what a peer's
    inbox sees), ``sent`` what left an uplink."""

    def __init__(self) -> None:
        self.delivered: Counter[str] = Counter()
        self.delivered_bytes: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.sent_bytes: Counter[str] = Counter()
        self.lost: Counter[str] = Counter()

    def deliver(self, kind: str, size: int, n: int = 1) -> None:
        self.delivered[kind] += n
        self.delivered_bytes[kind] += size * n

    def send(self, kind: str, size: int, n: int = 1) -> None:
        self.sent[kind] += n
        self.sent_bytes[kind] += size * n


class Network:
    def __init__(
        self,
        engine: Engine,
        cfg: NetConfig,
        n_peers: int,
        *,
        latency_rng: random.Random,
        loss_rng: random.Random,
        gossip_rng: random.Random,
    ) -> None:
        self.engine = engine
        self.cfg = cfg
        self.n = n_peers
        self._lat = latency_rng
        self._loss = loss_rng
        self._gossip = gossip_rng
        self._mu = math.log(cfg.latency_ms / 1000.0)
        self.up = [True] * n_peers
        self.partitions: list[Partition] = []
        self._uplink_free = [0.0] * n_peers
        self.traffic = Traffic()
        self.hops = max(1, math.ceil(math.log(max(n_peers, 2)) / math.log(max(cfg.mesh_degree, 2))))

    # -- reachability ----------------------------------------------------------------------
    def reachable(self, a: int, b: int) -> bool:
        if not (self.up[a] and self.up[b]):
            return False
        now = self.engine.now
        for p in self.partitions:
            if p.start <= now < p.end and ((a in p.side) != (b in p.side)):
                return False
        return True

    def latency(self) -> float:
        if self.cfg.jitter <= 0:
            return self.cfg.latency_ms / 1000.0
        return self._lat.lognormvariate(self._mu, self.cfg.jitter)

    def _depart(self, src: int, size: int, copies: int = 1) -> float:
        """When a message of ``size`` bytes queued on ``src``'s uplink has left it."""
        start = max(self.engine.now, self._uplink_free[src])
        done = start + copies * size / self.cfg.bandwidth
        self._uplink_free[src] = done
        return done

    # -- direct exchanges ------------------------------------------------------------------
    def send(
        self,
        src: int,
        dst: int,
        kind: str,
        size: int,
        deliver: Callable[..., None],
        args: tuple[Any, ...],
        on_fail: Callable[..., None] | None = None,
        fail_args: tuple[Any, ...] = (),
    ) -> None:
        """A message on a stream from ``src`` to ``dst``. ``deliver(*args)`` runs at the
        receiver; when the message cannot arrive, ``on_fail(*fail_args)`` runs at the sender
        after the exchange's time-out."""
        self.traffic.send(kind, size)
        lost = self.cfg.loss > 0 and self._loss.random() < self.cfg.loss
        if lost or not self.reachable(src, dst):
            self.traffic.lost[kind] += 1
            if on_fail is not None:
                self.engine.after(self.cfg.stream_timeout, f"fail {kind} {src}->{dst}", on_fail, *fail_args)
            return
        t = self._depart(src, size) + self.latency()
        self.engine.at(
            t,
            f"recv {kind} {src}->{dst}",
            self._arrive,
            src,
            dst,
            kind,
            size,
            deliver,
            args,
            on_fail,
            fail_args,
        )

    def _arrive(
        self,
        src: int,
        dst: int,
        kind: str,
        size: int,
        deliver: Callable[..., None],
        args: tuple[Any, ...],
        on_fail: Callable[..., None] | None,
        fail_args: tuple[Any, ...],
    ) -> None:
        # A partition or crash that began while the message was in flight also stops it.
        if not self.reachable(src, dst):
            self.traffic.lost[kind] += 1
            if on_fail is not None:
                self.engine.after(self.cfg.stream_timeout, f"fail {kind} {src}->{dst}", on_fail, *fail_args)
            return
        self.traffic.deliver(kind, size)
        deliver(*args)

    # -- gossip ----------------------------------------------------------------------------
    def receivers(self, src: int) -> Sequence[int]:
        """Who a publish from ``src`` reaches, partitions and crashes aside."""
        if self.cfg.gossip == "sampled" and self.cfg.sample < self.n - 1:
            picks = self._gossip.sample(range(self.n - 1), self.cfg.sample)
            return [p if p < src else p + 1 for p in picks]
        return [p for p in range(self.n) if p != src]

    def publish(
        self,
        src: int,
        kind: str,
        size: int,
        deliver: Callable[..., None],
        args: tuple[Any, ...],
        *,
        to: Sequence[int] | None = None,
        accounted: int = 0,
    ) -> None:
        """Gossip a message from ``src``: ``deliver(dst, *args)`` runs at each receiver in
        ``to`` (default: :meth:`receivers`). ``accounted`` more receptions are counted as
        traffic without an event (receivers whose state the message cannot change,
        docs/simulation.md "What is simulated, what is counted")."""
        targets = self.receivers(src) if to is None else to
        depart = self._depart(src, size, copies=min(self.cfg.mesh_degree, max(1, len(targets) + accounted)))
        self.traffic.send(kind, size, min(self.cfg.mesh_degree, max(1, len(targets) + accounted)))
        if accounted:
            self.traffic.deliver(kind, size, accounted)
        for dst in targets:
            if dst == src:
                continue
            if self.cfg.loss > 0 and self._loss.random() < self.cfg.loss:
                self.traffic.lost[kind] += 1
                continue
            if not self.reachable(src, dst):
                self.traffic.lost[kind] += 1
                continue
            t = depart
            for _ in range(self.hops):
                t += self.latency()
            self.engine.at(
                t, f"gossip {kind} {src}->{dst}", self._gossip_arrive, src, dst, kind, size, deliver, args
            )

    def _gossip_arrive(
        self, src: int, dst: int, kind: str, size: int, deliver: Callable[..., None], args: tuple[Any, ...]
    ) -> None:
        if not self.up[dst]:
            self.traffic.lost[kind] += 1
            return
        self.traffic.deliver(kind, size)
        deliver(dst, *args)
