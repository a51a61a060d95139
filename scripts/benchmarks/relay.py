"""Relay (issue 10 item 5, docs/design.md §10.7): what reaching a peer behind a NAT through a
circuit relay costs, against the same peers reached directly, in one run.

Two 3-daemon devnets on loopback, one after the other, with the same roles. Node 0 is the
bootstrap peer and offers only ``sleep``; node 1 submits; node 2 alone offers ``echo``, so every
task crosses from node 1 to node 2. In the *relayed* devnet node 0 is a circuit relay
(``network.relay_service``) and nodes 1 and 2 listen on no address and name node 0 in
``network.relays``: they know each other only by their adverts' circuit addresses, and every
byte between them is piped through node 0 (its Noise decrypt and encrypt, two yamux hops). In
the *direct* devnet nodes 1 and 2 dial each other.

Figures: the no-op ``echo`` submit → result latency (sequential tasks after a warm-up, so the
connection exists), and the rate of a task input fetch, node 2 fetching a fresh random input
from node 1: (award → done with the input) − (award → done without), as ``scripts/bench blobs``
measures it through daemons. No budget: the issue asks that it work and be measured.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from peerd.rpc.client import RpcClient
from scripts.benchmarks.common import (
    AreaResult,
    Check,
    Table,
    award_to_done,
    devnet,
    loadavg,
    log,
    pct,
    run_to_end,
)
from scripts.benchmarks.tasks import echo_spec

MB = 1e6


def _run_task(net: Any, spec: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """Submit at node 1 and follow it to its end; (client-side seconds, the ended task)."""
    t0 = time.perf_counter()
    _, end = run_to_end(net.socket(1), spec, 300)
    dt = time.perf_counter() - t0
    if end["shards"][0]["peer_id"] != net.peer_id(2):
        raise RuntimeError("the task ran somewhere other than node 2")
    return dt, end


def _measure(net: Any, count: int, size_mb: int, rounds: int) -> dict[str, Any]:
    spec = {**echo_spec(name="relay"), "bid_window_ms": 100}
    for _ in range(3):
        _run_task(net, spec)  # warm-up: connections, workers parked
    lat = [_run_task(net, spec)[0] * 1000 for _ in range(count)]
    rates = []
    pids = [net.pid(i) for i in range(3)]
    if None in pids:
        raise RuntimeError(f"a daemon of the devnet is not running: {pids}")
    procs = [psutil.Process(pid) for pid in pids]
    cpu0 = [sum(p.cpu_times()[:2]) for p in procs]
    with tempfile.TemporaryDirectory(prefix="pb-relay-") as d:
        src = Path(d) / "input.bin"
        for _ in range(rounds):
            base = award_to_done(_run_task(net, spec)[1])
            src.write_bytes(os.urandom(size_mb << 20))  # a blob node 2 cannot hold already
            with_input = award_to_done(_run_task(net, {**spec, "inputs": {"data": str(src)}})[1])
            if with_input <= base:
                raise RuntimeError(f"the task with the input took {with_input:.3f} s, without {base:.3f} s")
            rates.append((size_mb << 20) / (with_input - base) / MB)
    # Each daemon's own CPU (not its workers') over the fetches, per MB moved: where the time
    # of a relayed byte goes (the echo tasks around them cost a few ms each).
    moved = rounds * (size_mb << 20) / MB
    cpu_ms_per_mb = [(sum(p.cpu_times()[:2]) - c) * 1000 / moved for p, c in zip(procs, cpu0, strict=True)]
    counters = [RpcClient(net.socket(i)).call("node.info", {})["counters"] for i in (1, 2)]
    return {
        "lat": lat,
        "rates": rates,
        "cpu": cpu_ms_per_mb,
        "relayed_dials": sum(c.get("p2p.dials_relayed", 0) for c in counters),
    }


def run(quick: bool = False) -> AreaResult:
    res = AreaResult("relay")
    count = 10 if quick else 30
    size_mb = 16 if quick else 64
    rounds = 2 if quick else 4
    table = Table(
        f"Node 1 → node 2 on loopback, directly and through node 0 as a circuit relay: no-op (echo) "
        f"submit → result ({count} sequential tasks, bid window 100 ms; ms) and a {size_mb} MiB task "
        f"input fetched by node 2 from node 1 (median of {rounds}; MB/s = 10^6 B/s)",
        [
            "path",
            "echo p50",
            "echo p90",
            "input MB/s",
            "input MB/s, best",
            "CPU ms per MB: node 0 / 1 / 2",
            "relayed dials",
            "load avg",
        ],
    )
    out: dict[str, dict[str, Any]] = {}
    for label in ("direct", "through a relay"):
        log(f"relay: {label}")
        roles: dict[int, dict[str, dict[str, Any]]] = {
            0: {"offer": {"accept_kinds": ["sleep"]}},
            1: {"offer": {"accept_kinds": ["sleep"]}},
            2: {"offer": {"accept_kinds": ["echo"]}},
        }
        l0 = loadavg()
        natted = () if label == "direct" else (1, 2)
        with devnet("relay", 3, per_node=roles, natted=natted) as net:
            m = _measure(net, count, size_mb, rounds)
        rates = sorted(m["rates"])
        out[label] = {"p50": pct(m["lat"], 50), "rate": rates[len(rates) // 2]}
        table.add(
            label,
            pct(m["lat"], 50),
            pct(m["lat"], 90),
            rates[len(rates) // 2],
            rates[-1],
            " / ".join(f"{c:.1f}" for c in m["cpu"]),
            m["relayed_dials"],
            f"{l0:.1f}-{loadavg():.1f}",
        )
    res.tables.append(table)
    d, r = out["direct"], out["through a relay"]
    res.checks.append(
        Check(
            f"no-op p50 through a relay (no budget; direct {d['p50']:.0f} ms)",
            f"{r['p50']:.0f} ms ({r['p50'] / d['p50']:.2f} ×)",
            "-",
            None,
        )
    )
    res.checks.append(
        Check(
            f"task input fetch through a relay (no budget; direct {d['rate']:.0f} MB/s)",
            f"{r['rate']:.0f} MB/s ({r['rate'] / d['rate']:.2f} ×)",
            "-",
            None,
        )
    )
    res.notes.append(
        "Relayed: nodes 1 and 2 listen on no address and know each other only by their adverts' "
        "circuit addresses through node 0 (design.md §10.7); 'relayed dials' counts the circuits "
        "they opened (p2p.dials_relayed). CPU: each daemon's own process over the input fetches "
        "(node 1 serves, node 2 fetches, node 0 relays). Each devnet runs alone; the load column "
        "says how busy the machine was."
    )
    return res
