"""The market on an emulated WAN (issue 10 item 4; docs/devnet.md "An emulated WAN").

Three daemons, every pair joined by peerd/wanlink.py's link (``scripts/devnet up 3 --wan``):
adverts converge and every daemon-to-daemon byte crosses the emulated links; an echo task
completes; a partition that isolates the shard holder ends in a re-award and a done task;
after ``heal`` the peer tables converge within two advert intervals. Short delays keep the
module fast; every wait is bounded, and the one bound that is a claim ("two advert
intervals") is derived from the configured ``adverts.interval_s``, never asserted as a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
from conftest import TestNet, wait_for  # the integration tier's shared fixtures
from test_market import get, node_of, patch_config, submit, wait_done, wait_task

from peerd.wanlink import LinkParams

pytestmark = [pytest.mark.slow, pytest.mark.wan]

LINK = LinkParams(delay_s=0.025, jitter_s=0.005, loss=0.005, rate_bps=100e6)
ADVERT_INTERVAL_S = 1.5
CONFIG: dict[str, dict[str, Any]] = {
    "adverts": {"interval_s": ADVERT_INTERVAL_S, "ttl_s": 3 * ADVERT_INTERVAL_S},
    "market": {"lease_ttl_s": 3.0, "heartbeat_s": 0.5, "bid_window_ms": 200},
    "offer": {"accept_kinds": ["echo", "sleep"]},
}
#: Node 0 submits and runs none of the tasks here: every shard crosses a link.
SUBMITTER = {0: {"offer": {"accept_kinds": ["python"]}}}
N = 3


@pytest.fixture(scope="module")
def net(devnet_module: Callable[..., TestNet]) -> Iterator[TestNet]:
    net = devnet_module(N, CONFIG, start=False, wan=LINK)
    for i, extra in SUBMITTER.items():
        patch_config(net, i, extra)
    net.start(0)
    net.wait_ready(0)
    for i in range(1, N):
        net.start(i)
    for i in range(1, N):
        net.wait_ready(i)
    yield net


def full_tables(net: TestNet) -> bool:
    return all(len(net.peers(i)) == N for i in range(N))


def test_adverts_converge_and_every_byte_between_daemons_crosses_a_link(net: TestNet) -> None:
    wait_for(lambda: full_tables(net), "every peer table holds all 3 adverts", timeout=60, ignore=(OSError,))
    ports = net.wan_ports()
    relay_ports = {p["relay"] for p in ports.values()}
    daemon_ports = {p["daemon"] for p in ports.values()}
    # Peers only ever learn relay addresses (network.announce), the adverts' addrs included.
    for i in range(N):
        for entry in net.peers(i).values():
            assert entry["addrs"], entry
            for addr in entry["addrs"]:
                assert int(addr.split("/tcp/")[1].split("/")[0]) in relay_ports, addr
    # No TCP connection joins two daemons: a daemon's outbound connections go to relay ports,
    # its inbound ones come from the relay process.
    established = {
        i: [
            c
            for c in psutil.Process(net.pid(i)).net_connections(kind="tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.raddr
        ]
        for i in range(N)
    }
    # Read after the daemons' sockets, so every relay end of those connections already exists.
    relay_sockets = {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process(net.wan_pid()).net_connections(kind="tcp")
        if c.laddr
    }
    pairs = 0
    for i, conns in established.items():
        for c in conns:
            if c.laddr.port == ports[i]["daemon"]:
                assert (c.raddr.ip, c.raddr.port) in relay_sockets, (i, c)
            else:
                assert c.raddr.port not in daemon_ports, (i, c)
                pairs += c.raddr.port in relay_ports
    assert pairs >= N - 1, "the daemons hold no connection through the links"
    # The relay knew every dialler; both joiners dialled the bootstrap node through its link.
    stats = net.wan_stats()
    assert stats["unknown_sources"] == 0, stats
    assert {"1>0", "2>0"} <= set(stats["connections"]), stats
    # And it is delayed: no advert reached another daemon sooner than one link's minimum
    # one-way delay (on plain loopback they take a few ms). A lower bound only: a slow machine
    # can only make it larger. Stamps are ms (docs/benchmarks.md, adverts).
    floor = LINK.delay_s - LINK.jitter_s
    ids = net.ids()
    seen = []
    for i in range(N):
        for peer, entry in net.peers(i).items():
            if peer != ids[i]:
                seen.append(entry["received_at"] - entry["issued_at"])
    print(
        f"\n[measure] advert one-way latency over the WAN: min {min(seen) * 1e3:.0f} ms, "
        f"max {max(seen) * 1e3:.0f} ms (link {LINK.delay_s * 1e3:g} ± {LINK.jitter_s * 1e3:g} ms)"
    )
    assert min(seen) >= floor - 0.002, seen


def test_an_echo_task_completes_across_the_wan(net: TestNet) -> None:
    wait_for(lambda: full_tables(net), "every peer table holds all 3 adverts", timeout=60, ignore=(OSError,))
    # The submitter has measured its round trips to both contractors (yamux pings a new
    # connection after 0.5 s); each is at least the links' 2 x (25 - 5) ms.
    wait_for(
        lambda: all(p["rtt_ms"] is not None for p in net.peers(0).values() if not p["self"]),
        "node 0 measured its round trips",
        timeout=30,
        ignore=(OSError,),
    )
    floor_ms = 2 * (LINK.delay_s - LINK.jitter_s) * 1000
    assert all(p["rtt_ms"] >= floor_ms for p in net.peers(0).values() if not p["self"]), net.peers(0)
    task_id = submit(net, 0, {"kind": "echo", "params": {"data": "over the WAN"}, "deadline_s": 120})
    task = wait_done(net, 0, task_id, timeout=120)
    (shard,) = task["shards"]
    assert node_of(net, shard["peer_id"]) in (1, 2)
    # The spec names no bid window: the configured 200 ms is only the floor, and the round
    # trips across these links ask for 3 RTT + 200 ms or more (peerd/submitter.py).
    (announced,) = [e["message"] for e in task["events"] if e["message"].startswith("announced")]
    window = int(announced.split("bid window ")[1].split(" ms")[0])
    assert window >= 3 * floor_ms + 200, announced
    stamps = [e["at"] for e in task["events"]]
    print(f"\n[measure] echo over the WAN: submit → done {(stamps[-1] - stamps[0]) * 1e3:.0f} ms")


def test_a_partition_isolating_the_shard_holder_ends_in_a_reaward_then_heal_converges(
    net: TestNet,
) -> None:
    wait_for(lambda: full_tables(net), "every peer table holds all 3 adverts", timeout=60, ignore=(OSError,))
    reawarded_before = net.counters(0).get("tasks.reawarded", 0)
    task_id = submit(net, 0, {"kind": "sleep", "params": {"seconds": 4}, "deadline_s": 180})
    running = wait_task(
        net,
        0,
        task_id,
        lambda t: bool(t["shards"]) and t["shards"][0]["state"] == "running",
        "its shard running",
    )
    victim_id = running["shards"][0]["peer_id"]
    victim = node_of(net, victim_id)
    survivor = 3 - victim
    net.partition([[0, survivor], [victim]])
    try:
        task = wait_done(net, 0, task_id, timeout=120)
        (shard,) = task["shards"]
        assert shard["peer_id"] == net.peer_id(survivor)
        assert shard["epoch"] >= 1
        messages = [e["message"] for e in task["events"]]
        assert any("lease lost by" in m and victim_id[-8:] in m and "re-awarded" in m for m in messages), (
            messages
        )
        assert net.counters(0).get("tasks.reawarded", 0) > reawarded_before
        # The tables have split: the cut-off node's advert expired on this side and the others'
        # on its side (TTL = 3 advert intervals).
        ids = net.ids()
        ttl = float(CONFIG["adverts"]["ttl_s"])
        wait_for(
            lambda: victim_id not in net.peers(0) and ids[0] not in net.peers(victim),
            "the peer tables split",
            timeout=ttl + 2 * ADVERT_INTERVAL_S + 10,
        )
    finally:
        net.heal()
    # docs/devnet.md: after heal every table holds every advert again within two advert
    # intervals; the bound of this wait is that figure (from the config), not a timed assert.
    healed = time.monotonic()
    wait_for(
        lambda: full_tables(net),
        "peer tables converge after heal",
        timeout=2 * ADVERT_INTERVAL_S,
        interval=0.05,
    )
    print(
        f"\n[measure] peer tables full {time.monotonic() - healed:.2f} s after heal "
        f"(bound: 2 advert intervals = {2 * ADVERT_INTERVAL_S:g} s)"
    )
    assert get(net, 0, task_id)["state"] == "done"
