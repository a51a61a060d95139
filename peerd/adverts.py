"""Signed capacity and load adverts: build, sign, gossip, receive (seed §3.2 step 1).

A daemon advertises when something a peer would act on has changed, and otherwise only
refreshes its advert well before it expires (protocol/SPEC.md §7.2, docs/design.md §3.3):

* at once (coalesced to at most one per ``MIN_GAP_S``) when its load or offer changes —
  :meth:`AdvertService.poke`; that is how the freed capacity of a finished shard reaches the
  network within a second (seed §3.2 step 5);
* every ``interval_s`` it looks at its own state (memory, GPUs) and advertises only if it
  moved beyond the thresholds of :func:`significant_change`;
* every ``refresh_s`` (by default a third of the advert's lifetime, so two lost refreshes in a
  row still do not expire it) whatever happened: the lifetime is the staleness bound;
* ``JOIN_DELAY_S`` after a new connection, so a peer that just joined learns of us without
  waiting for a refresh (it is in a gossip mesh by then, see peerd/p2p.py);
* once more when it leaves on purpose (:meth:`AdvertService.leave`): draining, and expiring
  ``FAREWELL_TTL_S`` later, so peers drop it in seconds instead of at its lifetime's end.

An idle network thus carries one advert per peer per refresh instead of one per
``interval_s`` (issue 10: an idle daemon near zero). Every node receives every advert, so an
idle daemon's cost grows with the network's advert rate: the lifetime grows with the peer
table to hold that rate near ``network_rate`` (:func:`advert_lifetime_s`), up to an advert's
MAX_TTL. Received adverts go through the inbox (signature, signer = gossip origin, replay,
expiry) and only then into the peer table.
"""

from __future__ import annotations

import logging
import math
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
from protocol import cadence
from protocol.cadence import FAREWELL_TTL_S, MIN_GAP_S, advert_lifetime_s
from protocol.envelope import Signer
from protocol.errors import ProtocolError
from protocol.messages import Advert
from protocol.plausibility import check_advert

log = logging.getLogger(__name__)

TOPIC = "peerd/adverts/2"
#: After a new connection, re-advertise this much later: the newcomer is then grafted into
#: a gossip mesh (one gossipsub heartbeat, peerd/p2p.py) and receives the advert; joins
#: within the delay share one advert.
JOIN_DELAY_S = 1.5
#: What counts as a change worth an advert (:func:`significant_change`). Load moves in steps
#: of 1/slots, so any real change passes; memory and GPU figures drift all the time and are
#: informative only (nothing allocates on them), so only large moves count.
LOAD_STEP = 0.05
MEMORY_STEP = 0.10  # of total memory
VRAM_STEP = 0.10  # of the GPU's memory
UTIL_STEP_PCT = 25.0
#: How long leaving waits for libp2p to write the farewell to every neighbour.
FAREWELL_FLUSH_S = 1.0
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


async def _off_loop(fn: Callable[[], Any]) -> Any:
    """Run a probe off the event loop (NVML and psutil may block briefly); tests replace it."""
    return await trio.to_thread.run_sync(fn)


#: An advert's content without its sequence number and timestamps: what is compared to
#: decide whether a new advert is worth sending.
State = dict[str, Any]


def significant_change(old: State | None, new: State) -> bool:
    """Whether ``new`` differs from the last advertised ``old`` enough to advertise now.

    Capacity, hardware, offer (slots, busy, draining, kinds ...), parameters, addresses and
    version count on any change; load from :data:`LOAD_STEP`; available memory, free VRAM and
    GPU utilisation only beyond their steps.
    """
    if old is None:
        return True
    drifting = ("load", "memory", "gpus")
    if any(old.get(k) != new.get(k) for k in set(old) | set(new) if k not in drifting):
        return True
    if abs(float(new["load"]) - float(old["load"])) >= LOAD_STEP:
        return True
    mem_old, mem_new = old["memory"], new["memory"]
    if mem_old["total_mb"] != mem_new["total_mb"]:
        return True
    if abs(mem_new["available_mb"] - mem_old["available_mb"]) >= MEMORY_STEP * max(1, mem_new["total_mb"]):
        return True
    gpus_old = {g["index"]: g for g in old["gpus"]}
    gpus_new = {g["index"]: g for g in new["gpus"]}
    if gpus_old.keys() != gpus_new.keys():
        return True
    for index, g in gpus_new.items():
        was = gpus_old[index]
        if any(was[k] != g[k] for k in ("model", "vram_total_mb", "gflops")):
            return True
        if abs(g["vram_free_mb"] - was["vram_free_mb"]) >= VRAM_STEP * max(1, g["vram_total_mb"]):
            return True
        if abs(g["util_pct"] - was["util_pct"]) >= UTIL_STEP_PCT:
            return True
    return False


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
        refresh_s: float | None = None,
        network_rate: float = 0.0,
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
        self._ttl_s = ttl_s
        self._network_rate = network_rate
        #: A configured refresh fixes the lifetime at ``ttl_s`` (config checks refresh ≤ ttl / 2).
        self._fixed_refresh = refresh_s
        self._lifetime_ms = int(ttl_s * 1000)
        #: The longest we stay silent: a refresh comfortably before the lifetime ends
        #: (docs/config.md); recomputed at each publish (:meth:`_size_lifetime`).
        self._refresh = refresh_s if refresh_s is not None else cadence.refresh_s(ttl_s)
        self._wake = trio.Event()  # a poke or a newcomer
        self._poked = False
        self._published_at = -math.inf  # trio clock
        self._join_due = math.inf  # trio clock: re-advertise for a newcomer
        self._advertised: State | None = None
        #: Set by leave(): nothing may follow the farewell (a later advert would undo it).
        self._leaving = False
        self.current: Advert | None = None
        p2p.add_validator(TOPIC, self._on_gossip)
        p2p.on_peer_connected(self.peer_joined)

    def poke(self) -> None:
        """Something significant may have changed (load, draining): look at once."""
        self._poked = True
        self._wake.set()

    def peer_joined(self) -> None:
        """A peer connected: advertise soon, so it need not wait for our refresh."""
        try:
            due = trio.current_time() + JOIN_DELAY_S
        except RuntimeError:  # called outside trio (never by p2p); nothing to schedule
            return
        self._join_due = min(self._join_due, due)
        self._wake.set()  # the loop's next wake-up may now be earlier

    def build(self) -> Advert:
        return self._sealable(self.snapshot())

    def _size_lifetime(self) -> None:
        """Fit our advert's lifetime and refresh to the peer table (:func:`advert_lifetime_s`)."""
        if self._fixed_refresh is not None:
            return
        lifetime = advert_lifetime_s(
            len(self.table.alive(wall_ms())), ttl_s=self._ttl_s, network_rate=self._network_rate
        )
        self._lifetime_ms = int(lifetime * 1000)
        self._refresh = cadence.refresh_s(lifetime)

    def _sealable(self, state: State, *, lifetime_ms: int | None = None) -> Advert:
        now = wall_ms()
        lifetime = self._lifetime_ms if lifetime_ms is None else lifetime_ms
        return Advert(seq=self._seq.next(), issued_at=now, expires_at=now + lifetime, **state)

    def snapshot(self) -> State:
        """What we would advertise now, without sequence number and timestamps."""
        offer = self._offer()
        load, slots, busy = self._load()
        cpu = probes.cpu_info()
        total_mb, avail_mb = probes.memory_mb()
        gpus = [g for g in probes.gpu_info() if g.index in offer.gpus] if offer.gpus else []
        rated = {g.index: g.gflops for g in self.capacity.gpus}
        return dict(
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

    async def publish(self, state: State | None = None, *, farewell: bool = False) -> None:
        """Seal and gossip ``state`` (None: a fresh snapshot). ``farewell``: the last advert,
        living ``FAREWELL_TTL_S`` instead of our lifetime (:meth:`leave`)."""
        if self._leaving and not farewell:
            return  # a load change or refresh during leave() must not replace the farewell
        if state is None:
            state = await _off_loop(self.snapshot)
        self._size_lifetime()
        advert = self._sealable(state, lifetime_ms=int(FAREWELL_TTL_S * 1000) if farewell else None)
        self._advertised = state
        self._published_at = trio.current_time()
        self._join_due = math.inf
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

    async def leave(self) -> None:
        """Say we are leaving (SPEC §7.2): one last advert, draining, that expires in
        ``FAREWELL_TTL_S``; then give libp2p up to ``FAREWELL_FLUSH_S`` to write it out.

        Peers then stop expecting our bids at once (a draining peer offers nothing) and drop
        us from their tables seconds later, where a crash leaves us there for our lifetime.
        Best effort: the caller bounds it, and a daemon that cannot say goodbye still leaves.
        """
        state = dict(self._advertised) if self._advertised is not None else await _off_loop(self.snapshot)
        state["offer"] = {**state["offer"], "draining": True}
        self._leaving = True
        await self.publish(state, farewell=True)
        self._counters.inc("adverts.farewell")
        if not await self._p2p.flush(FAREWELL_FLUSH_S):
            log.info("leaving: the farewell advert may not have reached every neighbour")

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

    async def check(self) -> str | None:
        """Advertise if a refresh or a newcomer is due, or our state changed significantly.

        Returns why it advertised (``refresh``, ``joined``, ``changed``), or None.
        """
        state = await _off_loop(self.snapshot)
        now = trio.current_time()
        # By either clock: after a suspend (or a paused VM) the wall clock has moved on and
        # trio's monotonic one has not, so our advert has expired in every table (its lifetime
        # is wall-clock time, SPEC §6) while the refresh timer still waits. A CI run on
        # 2026-12-04 lost every process for 35 s that way.
        issued_ms = self.current.issued_at if self.current is not None else 0
        if now - self._published_at >= self._refresh or wall_ms() - issued_ms >= self._refresh * 1000:
            why = "refresh"
        elif now >= self._join_due:
            why = "joined"
        elif significant_change(self._advertised, state):
            why = "changed"
        else:
            return None
        await self.publish(state)
        self._counters.inc(f"adverts.{why}")
        return why

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await self.publish()
        task_status.started()
        next_look = trio.current_time() + self._interval
        while True:
            with trio.move_on_at(min(next_look, self._published_at + self._refresh, self._join_due)):
                await self._wake.wait()
            self._wake = trio.Event()
            if self._leaving:
                await trio.sleep_forever()  # leave() said the last word; the daemon is stopping
            now = trio.current_time()
            if self._poked:
                self._poked = False
                await trio.sleep(MIN_GAP_S)  # coalesce bursts of changes
            elif now < min(next_look, self._published_at + self._refresh, self._join_due):
                continue  # woken to reschedule (a newcomer's advert is due sooner)
            next_look = trio.current_time() + self._interval
            self.table.prune(wall_ms())
            await self.check()
