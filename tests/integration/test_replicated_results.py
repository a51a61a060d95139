"""Quorum-checked results for plain tasks (issue 8 item 5, SPEC §7.10), on real daemons.

Node 3 runs a patched launcher: it executes its jobs, then delivers a *wrong* output (the
honest bytes, case swapped: the size the kind declares), signed and committed as if genuine.
Before replication a plain task believed its one holder, so such a peer's bytes ended the
task ``done``. Here:

* with ``replicas = 3`` and three contractors, every peer holds one copy: the two honest
  copies agree, the liar's is outvoted, the task ends ``done`` with the honest bytes, the
  result says who agreed and who was outvoted, and node 0 observed the liar ``disagreed``;
* ``peerctl result`` writes a bundle that ``peerctl verify`` accepts, quorum included, and a
  manifest edited to credit the liar fails it;
* with ``replicas = 2`` the output is still the honest one (a copy on the liar is outvoted
  by one more copy on the other honest peer);
* a spot check with ``spot_fraction = 1`` (every shard drawn) gets a second copy after the
  first result; the output is the honest one, and the bundle's salt verifies.

Node 0 submits and runs no echo. Outcomes and counters are asserted, never timings.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import TestNet, wait_for
from test_market import BASE, output, patch_config, peerctl, submit, wait_done
from test_market_moves import start_with

LIAR = 3
HONEST = (1, 2)
CONFIG = {**BASE, "market": {**BASE["market"], "bid_window_ms": 2000}}

WRONG_RESULT_LAUNCHER = """
import dataclasses
import sys
import peerd.daemon as daemon
import peerd.contractor as contractor

execute = contractor.Contractor._execute

async def lying_execute(self, ann, action):
    r = await execute(self, ann, action)
    if not r.ok:
        return r
    # The same size, other bytes: within what the kind declares, so only a comparison finds it.
    return dataclasses.replace(r, outputs={n: v.swapcase() for n, v in r.outputs.items()})

contractor.Contractor._execute = lying_execute
sys.argv[0] = "peerd"
daemon.main()
"""


def start_liar(net: TestNet, tmp_path: Path) -> None:
    script = tmp_path / "wrong_result.py"
    script.write_text(WRONG_RESULT_LAUNCHER)
    start_with(net, LIAR, script)


def echo(i: int, replicas: int = 0, spot: float = 0.0) -> dict[str, Any]:
    spec = {"kind": "echo", "params": {"data": f"honest work {i}"}, "work": 1.0, "deadline_s": 120}
    if replicas:
        return {**spec, "verify": "replicate", "replicas": replicas}
    return {**spec, "verify": "spot-check", "spot_fraction": spot}


def stdout_of(net: TestNet, task: dict[str, Any]) -> bytes:
    return output(net, 0, task, "shard-0/stdout")


@pytest.mark.slow
def test_a_wrong_result_is_outvoted_by_the_replicas_and_the_bundle_proves_it(
    devnet: Callable[..., TestNet], tmp_path: Path
) -> None:
    net = devnet(4, CONFIG, start=False)
    patch_config(net, 0, {"offer": {"accept_kinds": ["sleep"]}})  # node 0 submits, runs no echo
    for i in (0, *HONEST):
        net.start(i)
    start_liar(net, tmp_path)
    for i in (0, *HONEST, LIAR):
        net.wait_ready(i)
    liar = net.peer_id(LIAR)
    honest = sorted(net.peer_id(i) for i in HONEST)
    wait_for(lambda: {liar, *honest} <= set(net.peers(0)), "node 0 to see every contractor", timeout=60)

    # 1. Three copies on three peers: the liar holds one and is outvoted.
    tid = submit(net, 0, echo(1, replicas=3))
    task = wait_done(net, 0, tid, timeout=110)
    assert stdout_of(net, task) == b"honest work 1"
    assert task["result"]["replicas"] == [
        {"shard": 0, "copies": [0, 1, 2], "agreed": honest, "disagreed": [liar]}
    ]
    assert sorted(s["peer_id"] for s in task["shards"]) == sorted([liar, *honest])
    wait_for(lambda: net.counters(0).get("trust.observed.disagreed", 0) >= 1, "the liar observed disagreeing",
             timeout=30)
    peers = {p["peer_id"]: p for p in json.loads(peerctl(net, 0, "peers", "--json").stdout)["peers"]}
    assert peers[liar]["trust"]["disagreed"] > 0.9

    # 2. The bundle proves it to an outsider; crediting the liar breaks it.
    out = tmp_path / "bundle"
    res = peerctl(net, 0, "result", tid, "-o", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    assert (out / "outputs" / "shard-0" / "stdout").read_bytes() == b"honest work 1"
    ok = peerctl(net, 0, "verify", str(out), "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    checks = {c["name"]: c for c in json.loads(ok.stdout)["checks"]}
    assert checks["quorum shard 0"]["ok"] and "2 of 3 peers" in checks["quorum shard 0"]["detail"]
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["result"]["replicas"][0]["agreed"] = sorted([liar, honest[0]])
    (out / "manifest.json").write_text(json.dumps(manifest))
    bad = peerctl(net, 0, "verify", str(out), "--json")
    assert bad.returncode != 0
    failed = {c["name"] for c in json.loads(bad.stdout)["checks"] if not c["ok"]}
    assert "manifest replicas" in failed

    # 3. Two copies: wherever they land, the output is the honest one.
    tid = submit(net, 0, echo(2, replicas=2))
    task = wait_done(net, 0, tid, timeout=110)
    assert stdout_of(net, task) == b"honest work 2"
    (q,) = task["result"]["replicas"]
    assert liar not in q["agreed"] and len(q["agreed"]) == 2

    # 4. A spot check drawing every shard: a second copy once the first result is in.
    tid = submit(net, 0, echo(3, spot=1.0))
    task = wait_done(net, 0, tid, timeout=110)
    assert stdout_of(net, task) == b"honest work 3"
    assert task["result"]["spot"]["checked"] == [0]
    assert "spot-check: a second copy" in " ".join(e["message"] for e in task["events"])
    (q,) = task["result"]["replicas"]
    assert liar not in q["agreed"] and len(q["agreed"]) == 2
    assert "spot_salt" not in task["spec"]  # the salt stays ours; the result shows it
    out = tmp_path / "spot"
    res = peerctl(net, 0, "result", tid, "-o", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    ok = peerctl(net, 0, "verify", str(out), "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    checks = {c["name"]: c for c in json.loads(ok.stdout)["checks"]}
    assert checks["spot-check salt"]["ok"] and checks["quorum shard 0"]["ok"]
