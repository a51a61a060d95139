"""When a daemon advertises (issue 10: an idle daemon near zero; protocol/SPEC.md §7.2).

The advert loop runs on trio's MockClock, with the machine probes replaced by a state the
test controls, so every figure below is a count of adverts, never a duration.
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from peerd import adverts
from peerd.adverts import JOIN_DELAY_S, MIN_GAP_S, AdvertService, Capacity, Offer, significant_change
from peerd.counters import Counters
from peerd.inbox import Inbox
from peerd.peertable import PeerTable
from peerd.seqstore import SequenceStore
from protocol.cadence import FAREWELL_TTL_S, advert_lifetime_s
from protocol.envelope import Signer, open_envelope

INTERVAL_S, TTL_S, REFRESH_S = 5.0, 60.0, 20.0


class FakeP2P:
    def __init__(self) -> None:
        self.published: list[tuple[float, bytes]] = []
        self.flushed: list[float] = []
        self.connected: list[Callable[[], None]] = []

    def add_validator(self, topic: str, fn: Any) -> None:
        pass

    def on_peer_connected(self, callback: Callable[[], None]) -> None:
        self.connected.append(callback)

    def listen_addrs(self) -> list[str]:
        return []

    async def publish(self, topic: str, raw: bytes) -> None:
        self.published.append((trio.current_time(), raw))

    async def flush(self, timeout_s: float) -> bool:
        self.flushed.append(timeout_s)
        return True

    def times(self) -> list[float]:
        return [t for t, _ in self.published]


def base_state() -> dict[str, Any]:
    return {
        "c0": 40.0,
        "load": 0.0,
        "cpu": {"cores": 4, "model": "test", "gflops": 40.0},
        "memory": {"total_mb": 16_000, "available_mb": 8_000},
        "gpus": (),
        "offer": {
            "cores": 4,
            "gpus": [],
            "memory_mb": 8_000,
            "kinds": ["echo"],
            "draining": False,
            "slots": 1,
            "busy": 0,
        },
        "params": {"k": 1.0, "dc_min": 0.1, "dc_max": None},
        "addrs": (),
        "version": "0.1.0",
    }


class Rig:
    def __init__(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        *,
        refresh_s: float | None = REFRESH_S,
        network_rate: float = 0.0,
    ) -> None:
        self.p2p = FakeP2P()
        self.counters = Counters()
        self.state = base_state()

        async def inline(fn: Callable[[], Any]) -> Any:
            return fn()

        # No threads: the MockClock would jump while a probe runs in one.
        monkeypatch.setattr(adverts, "_off_loop", inline)
        offer = Offer(
            cores=4, gpus=(), memory_mb=8_000, kinds=("echo",), draining=False, k=1.0, dc_min=0.1, dc_max=None
        )
        self.service = AdvertService(
            p2p=self.p2p,  # type: ignore[arg-type]
            signer=Signer(os.urandom(32)),
            seq=SequenceStore(tmp_path / "seq"),
            inbox=Inbox(self.counters),
            table=PeerTable(counters=self.counters),
            counters=self.counters,
            offer=lambda: offer,
            capacity=Capacity(cpu_gflops=40.0, gpus=()),
            load=lambda: (0.0, 1, 0),
            interval_s=INTERVAL_S,
            ttl_s=TTL_S,
            refresh_s=refresh_s,
            network_rate=network_rate,
        )
        monkeypatch.setattr(self.service, "snapshot", lambda: copy.deepcopy(self.state))

    def loads(self) -> list[float]:
        return [open_envelope(raw).message.load for _, raw in self.p2p.published]  # type: ignore[attr-defined]


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Rig:
    return Rig(tmp_path, monkeypatch)


def run_for(rig: Rig, seconds: float, script: Callable[[Rig], Any] | None = None) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(rig.service.run)
            if script is not None:
                await script(rig)
            await trio.sleep_until(seconds)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_an_idle_daemon_advertises_only_at_its_refresh(rig: Rig) -> None:
    run_for(rig, 65.0)
    # Old cadence: one advert per interval_s (13 here). Now: the first, then each refresh.
    times = rig.p2p.times()
    assert len(times) == 4, times
    assert times[0] == 0.0
    assert all(b - a >= REFRESH_S for a, b in itertools.pairwise(times)), times
    assert rig.counters.get("adverts.refresh") == 3
    assert rig.counters.get("adverts.published") == 4
    # Each advert lives three refreshes: two lost in a row still do not expire the node.
    first = open_envelope(rig.p2p.published[0][1]).message
    assert first.expires_at - first.issued_at == TTL_S * 1000


def test_a_load_change_is_advertised_at_once_and_a_poke_without_one_is_not(rig: Rig) -> None:
    async def script(r: Rig) -> None:
        await trio.sleep_until(7.0)
        r.service.poke()  # nothing changed
        await trio.sleep_until(9.0)
        r.state["load"] = 1.0
        r.state["offer"]["busy"] = 1
        r.service.poke()
        await trio.sleep_until(9.0 + 2 * MIN_GAP_S)
        r.state["load"] = 1.02  # below LOAD_STEP: not worth an advert
        r.service.poke()

    run_for(rig, 15.0, script)
    times = rig.p2p.times()
    assert len(times) == 2, times  # the first, and the change; nothing for the two other pokes
    assert 9.0 < times[1] <= 9.0 + MIN_GAP_S
    assert rig.loads() == [0.0, 1.0]
    assert rig.counters.get("adverts.changed") == 1


def test_drift_is_advertised_only_beyond_its_threshold(rig: Rig) -> None:
    async def script(r: Rig) -> None:
        await trio.sleep_until(1.0)
        r.state["memory"]["available_mb"] = 7_000  # 6 % of total: drift
        await trio.sleep_until(INTERVAL_S + 1.0)
        r.state["memory"]["available_mb"] = 5_000  # 19 % of total since the last advert

    run_for(rig, 3 * INTERVAL_S + 1.0, script)
    times = rig.p2p.times()
    assert len(times) == 2, times
    # Seen at the next look, not before and not at a refresh.
    assert INTERVAL_S + 1.0 < times[1] <= 2 * INTERVAL_S + 1.0 + MIN_GAP_S
    assert rig.counters.get("adverts.changed") == 1


def test_a_new_connection_brings_an_advert_without_waiting_for_the_refresh(rig: Rig) -> None:
    async def script(r: Rig) -> None:
        await trio.sleep_until(3.0)
        for callback in r.p2p.connected:
            callback()
        await trio.sleep_until(3.5)
        for callback in r.p2p.connected:  # a second newcomer in the same window shares it
            callback()

    run_for(rig, 15.0, script)
    times = rig.p2p.times()
    assert len(times) == 2, times
    assert times[1] == pytest.approx(3.0 + JOIN_DELAY_S)
    assert rig.counters.get("adverts.joined") == 1


def test_what_counts_as_a_significant_change() -> None:
    old = base_state()
    assert significant_change(None, old)
    assert not significant_change(old, copy.deepcopy(old))

    def changed(edit: Callable[[dict[str, Any]], None]) -> bool:
        new = copy.deepcopy(old)
        edit(new)
        return significant_change(old, new)

    assert changed(lambda s: s.update(load=0.05))
    assert not changed(lambda s: s.update(load=0.04))
    assert changed(lambda s: s["offer"].update(busy=1))
    assert changed(lambda s: s["offer"].update(draining=True))
    assert changed(lambda s: s["offer"].update(kinds=["echo", "sleep"]))
    assert changed(lambda s: s.update(c0=41.0))
    assert changed(lambda s: s.update(addrs=("/ip4/127.0.0.1/tcp/4001",)))
    assert not changed(lambda s: s["memory"].update(available_mb=7_000))
    assert changed(lambda s: s["memory"].update(available_mb=6_000))
    gpu = {
        "index": 0,
        "model": "X",
        "vram_total_mb": 10_000,
        "vram_free_mb": 9_000,
        "util_pct": 0.0,
        "gflops": 1e4,
    }
    with_gpu = copy.deepcopy(old)
    with_gpu["gpus"] = (gpu,)
    assert significant_change(old, with_gpu)  # a GPU appeared
    assert not significant_change(with_gpu, {**with_gpu, "gpus": ({**gpu, "util_pct": 20.0},)})
    assert significant_change(with_gpu, {**with_gpu, "gpus": ({**gpu, "util_pct": 30.0},)})
    assert not significant_change(with_gpu, {**with_gpu, "gpus": ({**gpu, "vram_free_mb": 8_500},)})
    assert significant_change(with_gpu, {**with_gpu, "gpus": ({**gpu, "vram_free_mb": 7_000},)})


def test_the_lifetime_grows_with_the_network_to_hold_its_advert_rate() -> None:
    # A small network keeps ttl_s; from 3N / rate > ttl_s the lifetime grows with N, which
    # holds the network's idle rate (N adverts per lifetime / 3) at the target ...
    assert advert_lifetime_s(5, ttl_s=60.0, network_rate=0.5) == 60.0
    assert advert_lifetime_s(10, ttl_s=60.0, network_rate=0.5) == 60.0
    assert advert_lifetime_s(15, ttl_s=60.0, network_rate=0.5) == 90.0
    assert advert_lifetime_s(20, ttl_s=60.0, network_rate=0.5) == 120.0
    for n in (12, 15, 18, 20):
        lifetime = advert_lifetime_s(n, ttl_s=60.0, network_rate=0.5)
        assert n / (lifetime / 3) == pytest.approx(0.5)
    # ... up to an advert's MAX_TTL, which every receiver enforces (SPEC §6).
    assert advert_lifetime_s(1000, ttl_s=60.0, network_rate=0.5) == 120.0
    assert advert_lifetime_s(0, ttl_s=10.0, network_rate=0.5) == 10.0
    # 0: a fixed lifetime.
    assert advert_lifetime_s(1000, ttl_s=60.0, network_rate=0.0) == 60.0


@pytest.mark.parametrize(("peers", "lifetime_s"), [(5, 60.0), (20, 120.0)])
def test_an_idle_daemon_refreshes_less_often_in_a_bigger_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, peers: int, lifetime_s: float
) -> None:
    rig = Rig(tmp_path, monkeypatch, refresh_s=None, network_rate=0.5)
    monkeypatch.setattr(rig.service.table, "alive", lambda now_ms, **kw: [object()] * peers)
    run_for(rig, lifetime_s + 5)
    times = rig.p2p.times()
    # The first advert, then one per third of the lifetime: 3 refreshes in one lifetime.
    assert len(times) == 4, times
    assert all(b - a >= lifetime_s / 3 for a, b in itertools.pairwise(times)), times
    for _, raw in rig.p2p.published:
        advert = open_envelope(raw).message
        assert advert.expires_at - advert.issued_at == lifetime_s * 1000  # type: ignore[attr-defined]


def test_a_configured_refresh_keeps_the_lifetime_fixed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(tmp_path, monkeypatch, refresh_s=REFRESH_S, network_rate=0.5)
    monkeypatch.setattr(rig.service.table, "alive", lambda now_ms, **kw: [object()] * 20)
    run_for(rig, 65.0)
    assert len(rig.p2p.times()) == 4
    first = open_envelope(rig.p2p.published[0][1]).message
    assert first.expires_at - first.issued_at == TTL_S * 1000  # type: ignore[attr-defined]


def test_leaving_publishes_a_short_lived_draining_advert_and_flushes_it(rig: Rig) -> None:
    async def script(r: Rig) -> None:
        await trio.sleep_until(3.0)
        await r.service.leave()

    run_for(rig, 4.0, script)
    assert len(rig.p2p.published) == 2
    first, farewell = (open_envelope(raw).message for _, raw in rig.p2p.published)
    assert not first.offer["draining"]  # type: ignore[attr-defined]
    assert farewell.offer["draining"]  # type: ignore[attr-defined]
    assert farewell.seq > first.seq  # type: ignore[attr-defined]  # it replaces the last advert
    assert farewell.expires_at - farewell.issued_at == FAREWELL_TTL_S * 1000  # type: ignore[attr-defined]
    # Everything else is what the last advert said.
    assert farewell.c0 == first.c0 and farewell.offer["kinds"] == first.offer["kinds"]  # type: ignore[attr-defined]
    assert rig.counters.get("adverts.farewell") == 1
    assert rig.p2p.flushed, "leave() must give libp2p time to write the farewell"


def test_nothing_replaces_the_farewell(rig: Rig) -> None:
    async def script(r: Rig) -> None:
        await trio.sleep_until(3.0)
        await r.service.leave()
        # A task ending during shutdown changes the load: that must not re-advertise.
        r.state["load"] = 1.0
        r.state["offer"]["busy"] = 1
        r.service.poke()

    run_for(rig, 2 * REFRESH_S, script)  # past a refresh too
    adverts = [open_envelope(raw).message for _, raw in rig.p2p.published]
    assert len(adverts) == 2, adverts
    assert adverts[-1].offer["draining"]  # type: ignore[attr-defined]


def test_a_jump_of_the_wall_clock_brings_a_refresh_at_the_next_look(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After the machine was suspended (or its VM paused: a CI run on 2026-12-04 lost every
    # process for 35 s) the wall clock has moved on and trio's monotonic one has not: our
    # advert expired in every table (its lifetime is wall-clock, SPEC §6), but the refresh
    # timer still waits. The next look at our state sees the jump and refreshes.
    jump_ms = 0

    def wall() -> int:
        return 1_800_000_000_000 + int(trio.current_time() * 1000) + jump_ms

    monkeypatch.setattr(adverts, "wall_ms", wall)

    async def script(r: Rig) -> None:
        nonlocal jump_ms
        await trio.sleep_until(7.0)
        jump_ms = 3_600_000  # an hour asleep

    run_for(rig, 15.0, script)
    times = rig.p2p.times()
    assert len(times) == 2, times  # the first, and one refresh at the next look after the jump
    assert 7.0 < times[1] <= 7.0 + INTERVAL_S
    assert rig.counters.get("adverts.refresh") == 1
    late = open_envelope(rig.p2p.published[1][1]).message
    assert late.issued_at >= 1_800_000_000_000 + 3_600_000  # stamped with the wall clock's time
