"""The simulator's own parts: clock and queue, network model, fault specs, random streams."""

from __future__ import annotations

import pytest

from sim.engine import Engine
from sim.faults import FaultSpec, FaultSpecError, draw, parse_duration
from sim.net import NetConfig, Network, Partition
from sim.rng import stream


def test_events_at_one_time_run_in_scheduling_order() -> None:
    eng = Engine()
    seen: list[str] = []
    for name in ("a", "b", "c"):
        eng.at(1.0, name, seen.append, name)
    eng.at(0.5, "first", seen.append, "first")
    eng.run(until=10.0)
    assert seen == ["first", "a", "b", "c"]
    assert eng.now == 10.0


def test_a_cancelled_event_does_not_run_and_leaves_no_trace() -> None:
    eng = Engine(keep_trace=True)
    seen: list[int] = []
    h = eng.at(1.0, "x", seen.append, 1)
    eng.at(2.0, "y", seen.append, 2)
    h.cancel()
    eng.run(until=5.0)
    assert seen == [2]
    assert eng.full == ["2.000000 y"]


def test_trace_hash_depends_on_times_and_labels() -> None:
    def trace(t: float) -> str:
        eng = Engine()
        eng.at(t, "e", lambda: None)
        eng.run(until=5.0)
        return eng.trace_hash

    assert trace(1.0) == trace(1.0)
    assert trace(1.0) != trace(1.5)


def _net(cfg: NetConfig, n: int = 4) -> tuple[Engine, Network]:
    eng = Engine()
    return eng, Network(
        eng, cfg, n, latency_rng=stream(1, "l"), loss_rng=stream(1, "x"), gossip_rng=stream(1, "g")
    )


def test_a_partition_blocks_direct_sends_and_reports_the_failure_after_the_timeout() -> None:
    eng, net = _net(NetConfig(jitter=0.0, stream_timeout=3.0))
    net.partitions.append(Partition(0.0, 10.0, frozenset({0})))
    got: list[tuple[str, float]] = []
    net.send(0, 1, "bid", 100, lambda: got.append(("in", eng.now)), (), lambda: got.append(("fail", eng.now)))
    net.send(2, 1, "bid", 100, lambda: got.append(("in", eng.now)), (), lambda: got.append(("fail", eng.now)))
    eng.run(until=20.0)
    assert ("fail", 3.0) in got
    assert [g for g in got if g[0] == "in"] == [("in", pytest.approx(0.04 + 100 / 12.5e6))]
    assert net.traffic.lost["bid"] == 1


def test_bandwidth_queues_messages_on_the_uplink() -> None:
    eng, net = _net(NetConfig(jitter=0.0, latency_ms=10.0, bandwidth=1000.0))
    got: list[float] = []
    for _ in range(3):
        net.send(0, 1, "blob", 500, lambda: got.append(eng.now), ())
    eng.run(until=10.0)
    # 0.5 s per message on a 1000 B/s uplink, then 10 ms of latency each.
    assert got == [pytest.approx(0.51), pytest.approx(1.01), pytest.approx(1.51)]


def test_loss_drops_about_the_stated_fraction() -> None:
    eng, net = _net(NetConfig(loss=0.3), n=2)
    got: list[int] = []
    for _ in range(2000):
        net.send(0, 1, "x", 10, lambda: got.append(1), ())
    eng.run(until=100.0)
    assert 0.25 < net.traffic.lost["x"] / 2000 < 0.35
    assert len(got) + net.traffic.lost["x"] == 2000


def test_jitter_reorders_messages_and_zero_jitter_does_not() -> None:
    for jitter, reordered in ((0.0, False), (0.8, True)):
        eng, net = _net(NetConfig(jitter=jitter, bandwidth=1e12), n=2)
        order: list[int] = []
        for i in range(50):
            net.send(0, 1, "x", 10, order.append, (i,))
        eng.run(until=100.0)
        assert (order != sorted(order)) is reordered


def test_sampled_gossip_reaches_the_sample_and_counts_the_rest() -> None:
    eng, net = _net(NetConfig(sample=3), n=50)
    assert len(net.receivers(7)) == 49
    net_s = Network(
        eng,
        NetConfig(gossip="sampled", sample=3),
        50,
        latency_rng=stream(1, "l"),
        loss_rng=stream(1, "x"),
        gossip_rng=stream(1, "g"),
    )
    picks = net_s.receivers(7)
    assert len(picks) == 3 and 7 not in picks and all(0 <= p < 50 for p in picks)


def test_fault_spec_parses_what_the_cli_accepts_and_names_what_it_refuses() -> None:
    spec = FaultSpec.parse("crash=0.05,partition=30s,liars=0.1,slow=0.2,loss=0.01,restart=10s-20s")
    assert (spec.crash, spec.partition, spec.liars, spec.slow, spec.loss) == (0.05, 30.0, 0.1, 0.2, 0.01)
    assert spec.restart == (10.0, 20.0)
    assert FaultSpec.parse("partition=1m@20s").partition_at == 20.0
    assert parse_duration("500ms") == 0.5
    for bad, word in (
        ("crash=2", "crash"),
        ("bogus=1", "bogus"),
        ("crash", "key=value"),
        ("partition=x", "duration"),
    ):
        with pytest.raises(FaultSpecError, match=word):
            FaultSpec.parse(bad)


def test_fault_draw_never_touches_protected_peers() -> None:
    spec = FaultSpec(crash=1.0, liars=0.5, slow=0.5)
    sched = draw(spec, 20, 100.0, stream(3, "f"), protect=frozenset({0, 1}))
    crashed = {c.peer for c in sched.crashes}
    assert crashed == set(range(2, 20))
    assert not ({0, 1} & (sched.liars | sched.slow))
    assert not (sched.liars & sched.slow)
    assert len(sched.liars) == 9


def test_random_streams_are_independent_per_concern() -> None:
    s1, s2 = stream(5, "latency"), stream(5, "faults")
    assert [s1.random() for _ in range(3)] != [s2.random() for _ in range(3)]
    assert stream(5, "latency").random() == stream(5, "latency").random()
    assert stream(5, "latency").random() != stream(6, "latency").random()
