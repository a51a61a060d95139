"""``--trust``: simulated submitters apply protocol/trust.py as the daemon does
(docs/allocation.md "Caps"), and every invariant still holds (awards with caps included)."""

from __future__ import annotations

from sim.faults import FaultSpec
from sim.run import run
from sim.world import SimConfig


def test_trust_runs_check_every_award_and_keep_the_invariants() -> None:
    cfg = SimConfig(
        peers=12, tasks=12, seed=5, faults=FaultSpec.parse("crash=0.3,restart=5s-10s"), trust=True
    )
    out = run(cfg)
    assert out.ok, out.violation
    c = out.stats["counters"]
    assert c.get("observed.done", 0) >= 1
    assert c["awards.shards"] >= out.stats["tasks_done"]

