"""Signed capacity and load adverts: build, sign, gossip, receive (seed §3.2 step 1).

Each daemon re-advertises every ``interval_s`` and at once (coalesced to at most one
per ``MIN_GAP_S``) when its load changes — that is how the freed capacity of a
finished shard reaches the network within a second (seed §3.2 step 5). Received
adverts go through the inbox (signature, signer = gossip origin, replay, expiry) and
only then into the peer table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from peerd import __version__, probes
from peerd.counters import Counters
from peerd.inbox import Inbox, wall_ms
from peerd.p2p import GossipMessage, P2PNode
from peerd.peertable import PeerTable
from peerd.seqstore import SequenceStore
from protocol.envelope import Signer
from protocol.errors import ProtocolError
from protocol.messages import Advert
from protocol.plausibility import check_advert

log = logging.getLogger(__name__)

TOPIC = "peerd/adverts/2"
#: Coalescing gap for change-triggered adverts: at 100 tasks/s the load changes
#: constantly, and one advert per change would flood gossip for no benefit.
MIN_GAP_S = 0.2
_KINDS = frozenset({"advert"})


@dataclass(frozen=True)
class Offer:
    """What the contributor offers (config ``[offer]``) and the network parameters."""

    cores: int
    gpus: tuple[int, ...]
    memory_mb: int
    kinds: tuple[str, ...]
    draining: bool
    k: float
    dc_min: float
    dc_max: float | None


@dataclass(frozen=True)
class Capacity:
    """The calibrated base capacity per device (GFLOP/s)."""

    cpu_gflops: float
    gpus: tuple[probes.GpuInfo, ...]

    def c0(self, offer: Offer) -> float:
        gpu = sum(g.gflops for g in self.gpus if g.index in offer.gpus)
        return round(self.cpu_gflops + gpu, 3)


def measure_capacity(offer_cores: int, *, calibrate: bool, seconds: float) -> Capacity:
    """Calibrate once at start: one core's matmul rate times the cores on offer (the
    daemon runs BLAS single-threaded, see peerd.daemon)."""
    per_core = probes.calibrate_cpu_gflops(seconds) if calibrate else 10.0
    return Capacity(cpu_gflops=round(per_core * max(offer_cores, 0), 3), gpus=tuple(probes.gpu_info()))


class AdvertService:
    def __init__(
        self,
        *,
        p2p: P2PNode,
        signer: Signer,
        seq: SequenceStore,
        inbox: Inbox,
        table: PeerTable,
        counters: Counters,
        offer: Callable[[], Offer],
        capacity: Capacity,
        load: Callable[[], tuple[float, int, int]],
        interval_s: float,
        ttl_s: float,
    ) -> None:
        self._p2p = p2p
        self._signer = signer
        self._seq = seq
        self._inbox = inbox
        self.table = table
        self._counters = counters
        self._offer = offer
        self.capacity = capacity
        self._load = load
        self._interval = interval_s
        self._ttl_ms = int(ttl_s * 1000)
        self._changed = trio.Event()
        self.current: Advert | None = None
        p2p.add_validator(TOPIC, self._on_gossip)

    def poke(self) -> None:
        """Something significant changed (load, draining): advertise at once."""
        self._changed.set()

    def build(self) -> Advert:
        offer = self._offer()
        load, slots, busy = self._load()
        cpu = probes.cpu_info()
        total_mb, avail_mb = probes.memory_mb()
        gpus = [g for g in probes.gpu_info() if g.index in offer.gpus] if offer.gpus else []
        rated = {g.index: g.gflops for g in self.capacity.gpus}
        now = wall_ms()
        return Advert(
            seq=self._seq.next(),
            issued_at=now,
            expires_at=now + self._ttl_ms,
            c0=self.capacity.c0(offer),
            load=round(min(load, 1000.0), 4),
            cpu={"cores": cpu.cores, "model": cpu.model, "gflops": self.capacity.cpu_gflops},
            memory={"total_mb": total_mb, "available_mb": avail_mb},
            gpus=tuple(
                {
                    "index": g.index,
                    "model": g.model,
                    "vram_total_mb": g.vram_total_mb,
                    "vram_free_mb": g.vram_free_mb,
                    "util_pct": g.util_pct,
                    "gflops": rated.get(g.index, g.gflops),
                }
                for g in gpus
            ),
            offer={
                "cores": offer.cores,
                "gpus": list(offer.gpus),
                "memory_mb": offer.memory_mb,
                "kinds": list(offer.kinds),
                "draining": offer.draining,
                "slots": slots,
                "busy": busy,
            },
            params={"k": offer.k, "dc_min": offer.dc_min, "dc_max": offer.dc_max},
            addrs=tuple(self._p2p.listen_addrs()[:16]),
            version=__version__,
        )

    async def publish(self) -> None:
        advert = await trio.to_thread.run_sync(self.build)  # NVML and psutil may block briefly
        raw = self._signer.seal(advert)
        signed = self._inbox.admit(raw, sender=self._signer.peer_id, kinds=_KINDS)
        if signed is not None:
            self.table.upsert(signed, wall_ms(), is_self=True)
        self.current = advert
        try:
            await self._p2p.publish(TOPIC, raw)
            self._counters.inc("adverts.published")
        except Exception as exc:  # a publish failure must not stop advertising
            log.warning("advert publish failed: %s", exc)
            self._counters.inc("adverts.publish_failed")

    async def _on_gossip(self, msg: GossipMessage) -> bool:
        signed = self._inbox.admit(msg.data, sender=msg.origin, kinds=_KINDS)
        if signed is None:
            return False
        try:
            check_advert(signed.message)  # type: ignore[arg-type]  # C⁰ within its hardware (SPEC §7.2)
        except ProtocolError as exc:
            self._counters.inc(f"dropped.{exc.reason}")
            return False
        self.table.upsert(signed, wall_ms())
        return True

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await self.publish()
        task_status.started()
        while True:
            with trio.move_on_after(self._interval):
                await self._changed.wait()
                await trio.sleep(MIN_GAP_S)  # coalesce bursts of changes
            self._changed = trio.Event()
            self.table.prune(wall_ms())
            await self.publish()
