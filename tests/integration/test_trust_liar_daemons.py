"""Trust the work, not the claim (issue 8 items 1–2; docs/allocation.md "Caps"), on real daemons.

A hostile daemon (node 3, started with a patched launcher) bids, at L = 0 for every task, the
largest C⁰ its advertised hardware could plausibly deliver (cores × 256 GFLOP/s, SPEC §7.2: a
claim of 10⁶ is now refused outright as ``implausible_c0``, tests/integration/
test_market_moves.py) — still far above what it has — and, once awarded, stays silent: no lease,
no result. Before trust it won every task it bid for. Here:

* at first nothing else can serve (the honest bidders are not up yet): the liar gets the task
  (probation allows it when no one else bids), goes silent, loses its lease, and the task is
  re-awarded to an honest peer that starts meanwhile — it completes;
* from then on the liar has history (one timeout, nothing delivered): its C is capped far
  below R (probation share × its fallen trust), so it wins none of the next tasks — all done,
  all on honest peers at epoch 0 — and ``task.explain`` says its C was capped and why;
* ``peerctl peer ban`` refuses its bids outright (``dropped.banned``), ``peerctl peers`` shows
  its history, ``peerctl peer unban`` lifts the ban.

Node 0 submits and does not run echo, so every shard runs on a bidder. Outcomes and counters
are asserted, never timings; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import TestNet, wait_for
from test_market import BASE, get, patch_config, peerctl, submit, wait_done, wait_task

from peerd.probes import cpu_info
from protocol.plausibility import CPU_GFLOPS_PER_CORE

ROOT = Path(__file__).resolve().parents[2]
LIAR = 3
HONEST = (1, 2)
TASKS_AFTER = 4
#: What the liar claims: the most its advertised hardware admits (SPEC §7.2), on this machine.
LIAR_CLAIM = cpu_info().cores * CPU_GFLOPS_PER_CORE
#: A bid window long enough for every bidder to answer on a loaded machine: a liar that is the
#: only bid in the window is "nothing else can serve it" and may take the task (by the rule).
CONFIG = {**BASE, "market": {**BASE["market"], "bid_window_ms": 2000}}

LIAR_LAUNCHER = """
import sys
import peerd.daemon as daemon
import protocol.machines.shard as shard
from peerd.probes import cpu_info
from protocol.plausibility import CPU_GFLOPS_PER_CORE

bid = shard.ShardMachine._bid
CLAIM = cpu_info().cores * CPU_GFLOPS_PER_CORE  # the most its advert's hardware admits

def lying_bid(self, now):
    self.c0, self.load = CLAIM, 0.0  # a plausible-looking lie, and idle
    return bid(self, now)

shard.ShardMachine._bid = lying_bid
shard.ShardMachine._on_award = lambda self, event, award: []  # awarded, then silent
sys.argv[0] = "peerd"
daemon.main()
"""


def start_liar(net: TestNet, tmp_path: Path) -> None:
    script = tmp_path / "liar.py"
    script.write_text(LIAR_LAUNCHER)
    d = net.node_dir(LIAR)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    env.pop("NOTIFY_SOCKET", None)
    with open(d / "peerd.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, str(script), "--config", str(d / "peerd.toml")],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
    net.procs[LIAR] = proc  # torn down with the net
    (d / "peerd.pid").write_text(str(proc.pid))


def echo(i: int) -> dict[str, Any]:
    return {"kind": "echo", "params": {"data": f"honest work {i}"}, "work": 1.0, "deadline_s": 120,
            "max_shards": 1}


def stdout_of(net: TestNet, task: dict[str, Any]) -> bytes:
    import base64

    ref = next(o for o in task["result"]["outputs"] if o["name"] == "shard-0/stdout")
    chunk = net.rpc(0, "blob.read", {"sha256": ref["sha256"], "offset": 0, "length": 1 << 16})
    return base64.b64decode(chunk["data_b64"])


@pytest.mark.slow
def test_a_liar_with_an_enormous_claim_is_capped_then_banned_and_every_task_completes(
    devnet: Callable[..., TestNet], tmp_path: Path
) -> None:
    net = devnet(4, CONFIG, start=False)
    patch_config(net, 0, {"offer": {"accept_kinds": ["sleep"]}})  # node 0 submits, runs no echo
    net.start(0)
    net.wait_ready(0)
    start_liar(net, tmp_path)
    net.wait_ready(LIAR)
    wait_for(lambda: liar_id(net) in net.peers(0), "node 0 to see the liar's advert", timeout=60)
    liar = liar_id(net)

    # 1. Nobody else bids: the liar gets the first task (nothing else can serve it).
    first = submit(net, 0, echo(0))
    wait_task(net, 0, first, lambda t: bool(t["shards"]) and t["shards"][0]["peer_id"] == liar,
              "the liar awarded the first task")
    for i in HONEST:
        net.start(i)
    for i in HONEST:
        net.wait_ready(i)
    # Silent after its award: its lease lapses, the shard moves to an honest bidder, done.
    task = wait_done(net, 0, first, timeout=110)
    (shard,) = task["shards"]
    assert shard["peer_id"] != liar and shard["epoch"] >= 1
    assert stdout_of(net, task) == b"honest work 0"
    c0 = net.counters(0)
    assert c0.get("trust.observed.timed_out", 0) >= 1 and c0.get("trust.observed.done", 0) >= 1
    reawarded = c0.get("tasks.reawarded", 0)
    assert reawarded >= 1

    # 2. With history, its claim counts for little: it wins none of the next tasks.
    for n in range(1, TASKS_AFTER + 1):
        tid = submit(net, 0, echo(n))
        task = wait_done(net, 0, tid)
        (shard,) = task["shards"]
        events = [e["message"] for e in task["events"]]
        assert shard["peer_id"] != liar and shard["epoch"] == 0, (shard, events)
        assert stdout_of(net, task) == f"honest work {n}".encode()
        explained = net.rpc(0, "task.explain", {"task_id": tid})
        bids = {b["peer_id"]: b for b in explained["bids"]}
        if liar in bids:  # it bids on every announce it hears
            b = bids[liar]
            assert b["uncapped"] == LIAR_CLAIM and not b["chosen"]
            assert b["cap"] is not None and b["cap"] < explained["demand"], b
            assert "failed before delivering" in b["cap_why"], b["cap_why"]
    c0 = net.counters(0)
    assert c0.get("tasks.reawarded", 0) == reawarded  # no task of phase 2 lost a holder
    assert c0.get("tasks.done", 0) >= 1 + TASKS_AFTER
    peers = {p["peer_id"]: p for p in json.loads(peerctl(net, 0, "peers", "--json").stdout)["peers"]}
    assert peers[liar]["trust"]["timed_out"] > 0.9 and peers[liar]["trust"]["done"] == 0
    assert peers[liar]["trust"]["shown_gflops"] is None
    # The honest peer that did the work has history (echo shards are too short to measure a
    # capacity: policy.min_measure_s).
    assert any((p["trust"] or {}).get("done", 0) >= 1 for pid, p in peers.items() if pid != liar)

    # 3. Banned by hand: its bids are refused and counted, the task still completes.
    ban = peerctl(net, 0, "peer", "ban", liar, "--reason", "claims too much", "--json")
    assert ban.returncode == 0, ban.stdout + ban.stderr
    assert json.loads(ban.stdout) == {"peer_id": liar, "banned": True, "changed": True}
    before = net.counters(0).get("dropped.banned", 0)
    tid = submit(net, 0, echo(99))
    task = wait_done(net, 0, tid)
    assert task["shards"][0]["peer_id"] != liar
    wait_for(lambda: net.counters(0).get("dropped.banned", 0) > before, "the liar's bid refused as banned",
             timeout=30)
    assert liar not in {b["peer_id"] for b in net.rpc(0, "task.explain", {"task_id": tid})["bids"]}
    shown = json.loads(peerctl(net, 0, "peers", "--json").stdout)
    row = next(p for p in shown["peers"] if p["peer_id"] == liar)
    assert row["trust"]["banned"] and row["trust"]["ban_reason"] == "banned by hand: claims too much"
    unban = peerctl(net, 0, "peer", "unban", liar, "--json")
    assert json.loads(unban.stdout)["changed"] is True
    assert get(net, 0, tid)["state"] == "done"


def liar_id(net: TestNet) -> str:
    return net.peer_id(LIAR)
