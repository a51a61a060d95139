"""``--replicated``: plain tasks with ``verify = replicate`` (SPEC §7.10) among lying peers.

Liars (``faults liars=``) return wrong plain outputs. The world checks every replicated
task's accepted outputs against the honest ones (``World.check_replicated``): a wrong one is
an invariant violation unless the liars were all of the shard's agreeing peers (what
replication cannot catch; counted as ``replicas.liar_majority``)."""

from __future__ import annotations

from sim.faults import FaultSpec
from sim.run import run
from sim.world import SimConfig


def test_replicated_tasks_never_accept_a_minority_liars_output() -> None:
    totals: dict[str, int] = {}
    for seed in (1, 2, 3, 4):
        cfg = SimConfig(
            peers=20,
            tasks=12,
            seed=seed,
            aggregated=0.0,
            replicated=1.0,
            arrival_rate=0.1,
            faults=FaultSpec.parse("liars=0.2"),
        )
        out = run(cfg)
        assert out.ok, (seed, out.violation)
        for k, v in out.stats["counters"].items():
            if k.startswith("replicas.") or k == "tasks.replicas_added":
                totals[k] = totals.get(k, 0) + v
    # The sweep exercises the rule, not just its absence: liars were outvoted, copies were
    # added on disagreement, and honest outputs were accepted.
    assert totals.get("replicas.outvoted", 0) >= 1, totals
    assert totals.get("tasks.replicas_added", 0) >= 1, totals
    assert totals.get("replicas.correct", 0) >= 1, totals


def test_a_replicated_run_is_deterministic() -> None:
    cfg = SimConfig(
        peers=12, tasks=6, seed=9, aggregated=0.0, replicated=1.0, faults=FaultSpec.parse("liars=0.2")
    )
    a, b = run(cfg), run(cfg)
    assert a.ok and b.ok
    assert a.stats["trace_sha256"] == b.stats["trace_sha256"]
