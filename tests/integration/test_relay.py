"""Contributors behind NATs, through a relay peer (docs/design.md §10.7, issue 10 item 5).

A real 3-daemon devnet on 127.0.0.1, on loopback and on the emulated WAN (every
daemon-to-daemon byte through peerd/wanlink.py's delaying, lossy links). Node 0 is the
bootstrap peer and a circuit relay (``network.relay_service``). Nodes 1 and 2 stand for
machines behind NATs: they listen on no address at all, so nobody can dial them, and name node
0 in ``network.relays``. They are DHT clients, so no lookup hands either one to the other:
every byte between them crosses a circuit through node 0. Node 1 submits an ``echo`` task with
an input file that only node 2 may take; the bid, the award, node 2's fetch of the input from
node 1 and the result all cross the relay.
Every wait is a bounded polling loop.
"""

from __future__ import annotations

import functools
import os
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import TestNet, wait_for
from test_market import BASE, get, patch_config, submit, wait_done

from peerd.wanlink import LinkParams

pytestmark = pytest.mark.slow

WAN = LinkParams(delay_s=0.025, jitter_s=0.005, loss=0.005, rate_bps=100e6)


def _bootstrap_of(net: TestNet, i: int) -> str:
    """Node 0's address as the others dial it: its listen port, or its link's port on the WAN."""
    cfg = tomllib.loads((net.node_dir(i) / "peerd.toml").read_text())
    return str(cfg["network"]["bootstrap"][0])


@pytest.mark.parametrize("wan", [None, WAN], ids=["loopback", "wan"])
def test_two_peers_behind_nats_trade_a_task_through_a_relay(
    devnet: Callable[..., TestNet], tmp_path: Path, wan: LinkParams | None
) -> None:
    net = devnet(3, BASE, start=False, wan=wan)
    relay = _bootstrap_of(net, 1)
    natted = {"listen": [], "announce": [], "relays": [relay]}
    patch_config(net, 0, {"network": {"relay_service": True}, "offer": {"accept_kinds": ["sleep"]}})
    patch_config(net, 1, {"network": natted, "offer": {"accept_kinds": ["sleep"]}})
    patch_config(net, 2, {"network": natted, "offer": {"accept_kinds": ["echo"]}})
    for i in range(3):
        net.start(i)
    for i in range(3):
        net.wait_ready(i)
    assert net.wait_peers(3, timeout=60), "the devnet never saw every advert"

    def reserved(i: int) -> bool | None:
        return net.counters(i).get("p2p.relay_reservations", 0) >= 1 or None

    for i in (1, 2):
        wait_for(functools.partial(reserved, i), f"node {i}'s reservation at the relay", timeout=30)
        # All a NAT'd node announces is its circuit address through the relay.
        assert net.info(i)["listen_addrs"] == [f"{relay}/p2p-circuit/p2p/{net.peer_id(i)}"]
    # Each knows the other from its advert (gossip through the relay), by its circuit address
    # only, and is connected to the relay alone.
    assert net.peers(1)[net.peer_id(2)]["addrs"] == [f"{relay}/p2p-circuit/p2p/{net.peer_id(2)}"]
    assert [net.info(i)["connected_peers"] for i in (1, 2)] == [1, 1]

    data = tmp_path / "input.bin"
    data.write_bytes(os.urandom(3 << 20))
    task_id = submit(
        net,
        1,
        {
            "kind": "echo",
            "work": 1.0,
            "deadline_s": 120,
            "max_shards": 1,
            "params": {"data": "through the relay"},
            "inputs": {"data": str(data)},
        },
    )
    task = wait_done(net, 1, task_id, timeout=120)
    (shard,) = task["shards"]
    assert shard["peer_id"] == net.peer_id(2)
    assert get(net, 1, task_id)["state"] == "done"
    # The one connection between them is a circuit one of them dialled through the relay.
    dialled = [net.counters(i).get("p2p.dials_relayed", 0) for i in (1, 2)]
    assert sum(dialled) >= 1, dialled
