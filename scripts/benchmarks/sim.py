"""The simulator at 100, 1,000 and 10,000 virtual peers (issue 7 item 4, docs/simulation.md).

Each figure is one ``python -m sim --json`` run in a child process (its wall time is the
simulator's own, measured around the process; the load average is noted because the
machine is shared). Three configurations per size:

* **today** — the protocol as it is: adverts and every task message to every peer, every
  peer bids. Beyond 64 bidders the award cannot quote every bid (``Award.bids`` holds 64):
  the run stops with a machine error at the first award, which the table says.
* **solicited** — bids solicited from 16 sampled peers, task messages to the task's
  followers only; adverts still to every peer. Award latency and the simulator's wall
  time are measured here.
* **sampled adverts** — as solicited, with adverts to 16 random peers instead of all.

"task msg/peer/s if to all" is what each peer would receive if every task message published
went to every peer, as today's gossip does (published × (N − 1) / N / virtual time).

Budget (issue 7): ``./scripts/sim --peers 1000 --tasks 200 --seed 1`` ≤ 10 minutes wall on
2 cores, reported for the exact command and for the solicited variant.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from scripts.benchmarks.common import ROOT, AreaResult, Check, Table, budget_le, loadavg, log

SIZES = ((100, 50), (1000, 200), (10000, 200))
QUICK_SIZES = ((100, 20), (1000, 40))
SAMPLE = 16
BUDGET_S = 600.0


def _sim(*args: str, timeout: float = 3600.0) -> tuple[dict[str, Any], float, float]:
    """Run the simulator; returns (its JSON summary, wall seconds, load average at start)."""
    l0 = loadavg()
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "sim", "--json", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    wall = time.monotonic() - t0
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"sim {' '.join(args)} exited {proc.returncode}: {proc.stderr[-500:]}")
    return json.loads(proc.stdout), wall, l0


def _outcome(doc: dict[str, Any]) -> str:
    if doc["invariants"] == "ok":
        return "invariants ok"
    v = str(doc["violation"])
    return ("machine error: " if v.startswith("machine error") else "VIOLATION: ") + v.split(": ")[-1][:70]


def run(quick: bool = False) -> AreaResult:
    res = AreaResult("sim")
    sizes = QUICK_SIZES if quick else SIZES
    table = Table(
        "Simulated peers (seed 1, no faults): traffic per peer, award latency (virtual), simulator wall time",
        [
            "peers",
            "tasks",
            "mode",
            "signatures",
            "advert msg/peer/s",
            "advert kB/peer/s",
            "task msg/peer/s",
            "task msg/peer/s if to all",
            "award p50 s",
            "award p99 s",
            "done / failed",
            "virtual s",
            "events",
            "wall s",
            "load avg",
            "outcome",
        ],
    )
    modes = (
        ("today", []),
        ("solicited", ["--bidders", str(SAMPLE)]),
        ("sampled adverts", ["--bidders", str(SAMPLE), "--adverts", f"sampled:{SAMPLE}"]),
    )
    for n, tasks in sizes:
        stub = n >= 10000
        for mode, extra in modes:
            args = ["--peers", str(n), "--tasks", str(tasks), "--seed", "1", *extra]
            if stub:
                args.append("--stub-signatures")
            log(f"sim: {n} peers, {tasks} tasks, {mode}")
            doc, wall, l0 = _sim(*args)
            pp = doc["per_peer_per_s"]
            al = doc["award_latency_s"]
            table.add(
                n,
                tasks,
                mode,
                "stub" if stub else "real",
                pp["advert_messages"],
                pp["advert_bytes"] / 1000,
                pp["task_messages"],
                doc["task_msgs_per_peer_s_if_gossiped_to_all"],
                al["p50"],
                al["p99"],
                f"{doc['tasks_done']} / {doc['tasks_failed']}",
                doc["virtual_s"],
                doc["events"],
                wall,
                l0,
                _outcome(doc),
            )
    res.tables.append(table)
    # The budget, for the exact command of issue 7 and for the solicited variant.
    if not quick:
        for label, extra in (("as given", []), (f"--bidders {SAMPLE}", ["--bidders", str(SAMPLE)])):
            doc, wall, l0 = _sim("--peers", "1000", "--tasks", "200", "--seed", "1", *extra)
            check = budget_le(
                f"./scripts/sim --peers 1000 --tasks 200 --seed 1 ({label}) wall", wall, BUDGET_S, "s"
            )
            res.checks.append(check)
            held = doc["invariants"] == "ok"
            res.checks.append(
                Check(
                    f"./scripts/sim --peers 1000 --tasks 200 --seed 1 ({label}) invariants",
                    _outcome(doc),
                    "every invariant held",
                    held,
                )
            )
            res.notes.append(f"{label}: wall {wall:.1f} s at load average {l0:.2f}; {_outcome(doc)}")
    res.notes.append(
        "Adverts are counted, not delivered as events (docs/simulation.md); 10,000-peer runs stub the "
        "signatures (--stub-signatures); each unique envelope is verified once per process otherwise."
    )
    return res
