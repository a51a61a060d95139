"""``python -m sim`` (what ./scripts/sim runs): summary, exit status, JSON, usage errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sim.faults import FaultSpec
from sim.run import run
from sim.world import SimConfig

ROOT = Path(__file__).resolve().parents[2]


def _sim(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "sim", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_a_clean_run_prints_the_figures_and_exits_0() -> None:
    proc = _sim("--peers", "12", "--tasks", "4", "--seed", "2")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in (
        "tasks:",
        "award latency (virtual): p50",
        "per peer per second:",
        "committee load:",
        "signatures: real (Ed25519)",
    ):
        assert needle in out
    assert out.rstrip().endswith("invariants: ok")


def test_json_summary() -> None:
    proc = _sim("--peers", "12", "--tasks", "4", "--seed", "2", "--json", "--stub-signatures")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["invariants"] == "ok" and doc["violation"] is None
    assert doc["tasks_done"] + doc["tasks_failed"] + doc["tasks_cancelled"] == 4
    assert doc["signatures"].startswith("stub")
    assert doc["per_peer_per_s"]["advert_messages"] > 0


def test_a_violation_prints_the_seed_and_the_trace_and_exits_1() -> None:
    liars = FaultSpec.parse("liars=0.2")
    seed = next(
        s
        for s in range(1, 51)
        if not run(SimConfig(peers=20, tasks=6, seed=s, faults=liars, planted_bug="second_commit")).ok
    )
    args = (
        "--peers",
        "20",
        "--tasks",
        "6",
        "--seed",
        str(seed),
        "--faults",
        "liars=0.2",
        "--plant-bug",
        "second_commit",
        "--trace-tail",
        "30",
    )
    proc = _sim(*args)
    assert proc.returncode == 1
    assert f"seed {seed}: invariant violated:" in proc.stderr
    assert "a second certified aggregate" in proc.stderr
    trace = [line for line in proc.stderr.splitlines() if line.startswith("  ") and " " in line.strip()]
    assert len(trace) == 30
    assert "invariants: VIOLATED" in proc.stdout
    again = _sim(*args)
    assert again.stderr == proc.stderr  # the same seed replays the same trace


def test_usage_errors_exit_2_and_name_the_problem() -> None:
    proc = _sim("--faults", "bogus=1")
    assert proc.returncode == 2 and "bogus" in proc.stderr
    proc = _sim("--adverts", "sampled:x")
    assert proc.returncode == 2 and "--adverts" in proc.stderr
