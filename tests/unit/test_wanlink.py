"""peerd/wanlink.py's link model (docs/devnet.md "An emulated WAN"): units, delay and order,
rate, loss as a retransmission stall, and which pairs a partition cuts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peerd.wanlink import (
    MSS,
    UNKNOWN,
    LinkParams,
    Links,
    Relay,
    parse_duration,
    parse_percent,
    parse_rate,
    write_state,
)


def test_units_parse_as_the_devnet_cli_writes_them() -> None:
    assert parse_duration("40ms") == pytest.approx(0.040)
    assert parse_duration("0.5s") == pytest.approx(0.5)
    assert parse_duration("40") == pytest.approx(0.040)
    assert parse_percent("1%") == pytest.approx(0.01)
    assert parse_rate("100mbit") == 100e6 and parse_rate("0") == 0
    for bad in ("-1ms", "nan", "fast"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(ValueError):
        parse_percent("100%")
    with pytest.raises(ValueError):
        LinkParams(delay_s=0.01, jitter_s=0.02)


def relay(tmp_path: Path, params: LinkParams) -> Relay:
    write_state(tmp_path, params, {0: {"daemon": 1, "relay": 2}, 1: {"daemon": 3, "relay": 4}}, [], 0)
    return Relay(tmp_path, seed=7)


def test_delay_and_jitter_bound_arrival_and_order_is_kept(tmp_path: Path) -> None:
    p = LinkParams(delay_s=0.040, jitter_s=0.010, loss=0.0, rate_bps=0)
    r = relay(tmp_path, p)
    last = 0.0
    for k in range(500):
        ((t, data),) = r.schedule(b"x" * 100, now=k * 0.001, a=0, b=1, last=last)
        assert data == b"x" * 100
        assert t >= k * 0.001 + p.delay_s - p.jitter_s
        assert t >= last  # TCP delivers in order: jitter never reorders a stream
        last = t


def test_rate_serialises_chunks_on_one_link_direction(tmp_path: Path) -> None:
    p = LinkParams(delay_s=0.0, jitter_s=0.0, loss=0.0, rate_bps=8e6)  # 1 MB/s
    r = relay(tmp_path, p)
    times = [r.schedule(b"x" * 100_000, now=0.0, a=0, b=1, last=0.0)[0][0] for _ in range(3)]
    assert times == pytest.approx([0.1, 0.2, 0.3])
    # The other direction is its own queue.
    assert r.schedule(b"x" * 100_000, now=0.0, a=1, b=0, last=0.0)[0][0] == pytest.approx(0.1)


def test_a_lost_segment_stalls_the_rest_of_the_chunk_by_an_rto_or_an_rtt(tmp_path: Path) -> None:
    p = LinkParams(delay_s=0.040, jitter_s=0.0, loss=0.05, rate_bps=0)
    assert p.rto_s == pytest.approx(0.2)  # Linux's floor: 2 x 40 ms is below it
    r = relay(tmp_path, p)
    stalls = {"rto": 0, "rtt": 0}
    for _ in range(400):
        data = bytes(range(256)) * 40  # 10240 B: 8 segments
        parts = r.schedule(data, now=0.0, a=0, b=1, last=0.0)
        assert b"".join(piece for _, piece in parts) == data  # nothing is dropped, only late
        if len(parts) == 1 and parts[0][0] == pytest.approx(0.040):
            continue
        *head, (t_late, tail) = parts
        lost_at = (len(data) - len(tail)) // MSS
        if -(-len(data) // MSS) - lost_at - 1 >= 3:  # three segments after it: fast retransmit
            assert t_late == pytest.approx(0.040 + p.rtt_s)
            stalls["rtt"] += 1
        else:
            assert t_late == pytest.approx(0.040 + p.rto_s)
            stalls["rto"] += 1
        assert all(t == pytest.approx(0.040) for t, _ in head)
    assert stalls["rto"] and stalls["rtt"], stalls
    assert r.stats["segments_lost"] == sum(stalls.values())


class _Script:
    """A stand-in for the relay's random source: ``random()`` answers from a script."""

    def __init__(self, draws: list[float]) -> None:
        self.draws = draws

    def random(self) -> float:
        return self.draws.pop(0) if self.draws else 1.0

    def uniform(self, a: float, b: float) -> float:
        return 0.0


def test_losses_in_one_flight_stall_once_not_once_per_loss(tmp_path: Path) -> None:
    # 100 Mbit/s, 40 ms each way: three 64 KiB chunks read at once, each losing its first
    # segment. TCP with SACK retransmits all three within one recovery, so the last byte is
    # due one RTT after it would have been, not three (what a stall charged on top of the
    # previous stall gave, and what made an 8 MiB blob take 4-5 s on the WAN devnet).
    p = LinkParams(delay_s=0.040, jitter_s=0.0, loss=0.01, rate_bps=100e6)
    r = relay(tmp_path, p)
    chunk = b"y" * 65536
    r._rng = _Script([0.0, 0.0, 0.0])  # type: ignore[assignment]  # each chunk: segment 0 lost
    last = 0.0
    due = []
    for k in range(3):
        parts = r.schedule(chunk, now=0.0, a=0, b=1, last=last)
        assert len(parts) == 1  # lost at segment 0: the whole chunk waits
        last = parts[0][0]
        due.append((k + 1) * len(chunk) * 8 / p.rate_bps + p.delay_s)
        assert last == pytest.approx(due[-1] + p.rtt_s)
    assert r.stats["segments_lost"] == 3
    # In order still: a later chunk never arrives before a stalled one.
    ((t, _),) = r.schedule(b"z" * 100, now=0.0, a=0, b=1, last=last)
    assert t >= last


def test_a_partition_cuts_only_links_between_groups() -> None:
    links = Links()
    assert links.up(0, 2) and links.up(UNKNOWN, 1)
    links.set_groups([[0, 1], [2]])
    assert links.up(0, 1) and not links.up(0, 2) and not links.up(2, 1)
    assert not links.up(UNKNOWN, 0)  # an unidentified dialler is cut off while partitioned
    links.set_groups([[0], [1]])
    assert links.up(2, 3)  # nodes no group names form one more group
    assert not links.up(2, 0)
    links.set_groups([])
    assert links.up(0, 2)


def test_state_file_round_trips(tmp_path: Path) -> None:
    p = LinkParams(delay_s=0.03, jitter_s=0.01, loss=0.02, rate_bps=1e6)
    write_state(tmp_path, p, {0: {"daemon": 10, "relay": 11}}, [[0]], 3)
    state = json.loads((tmp_path / "wan.json").read_text())
    assert LinkParams(**state["params"]) == p and state["generation"] == 3
    assert Relay(tmp_path).nodes == {0: {"daemon": 10, "relay": 11}}


def test_a_wan_devnet_announces_and_bootstraps_only_through_relay_ports(tmp_path: Path) -> None:
    import tomllib

    from peerd.devnet import Devnet

    net = Devnet(tmp_path / "net")
    net.configure(3, wan=LinkParams())
    ports = net.wan_ports()
    assert len({p for v in ports.values() for p in v.values()}) == 6  # six distinct ports
    for i in range(3):
        cfg = tomllib.loads((net.node_dir(i) / "peerd.toml").read_text())["network"]
        assert cfg["listen"] == [f"/ip4/127.0.0.1/tcp/{ports[i]['daemon']}"]
        assert cfg["announce"] == [f"/ip4/127.0.0.1/tcp/{ports[i]['relay']}"]
        for addr in cfg["bootstrap"]:
            assert addr.startswith(f"/ip4/127.0.0.1/tcp/{ports[0]['relay']}/p2p/")
    # Without --wan nothing of the emulator is configured.
    plain = Devnet(tmp_path / "plain")
    plain.configure(2)
    assert "announce" not in tomllib.loads((plain.node_dir(1) / "peerd.toml").read_text())["network"]
    assert not (plain.dir / "wan.json").exists()
