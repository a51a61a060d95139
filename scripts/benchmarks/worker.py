"""Warm worker (issue 3, docs/design.md §8): per-task overhead of the sandboxed worker pool.

The pool is driven directly (``peerd.executor.WorkerPool``, no daemon), one CPU slot, a light
warm spare, bubblewrap as in the daemon. ``echo`` jobs from one submitter are run back to back:
after the first, each reuses the worker parked for that submitter, which is the path every
no-op task of a busy submitter takes. Per-task overhead = ``execute()`` wall time minus the
worker's own time in the kind (``worker_seconds``, microseconds for echo): the job frame out,
the input directory, cgroup limits, the result frame back, parking the worker.

For comparison, jobs from a new submitter each time take the warm spare (never a worker that
served someone else), which then has to be killed and replaced.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import trio

from peerd.executor import Job, WorkerPool
from scripts.benchmarks.common import AreaResult, Table, budget_le, log, pct


async def _measure(root: Path, same: int, fresh: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"same": [], "same_job": [], "fresh": [], "fresh_job": []}
    pool = WorkerPool(root, devices=("cpu",), warm_classes=("light",))
    if not pool.sandboxed:
        log(f"worker: no sandbox ({pool.sandbox_report.reason}); measuring without one")
        pool = WorkerPool(root, devices=("cpu",), warm_classes=("light",), require_sandbox=False)
    out["sandboxed"] = [float(pool.sandboxed)]
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        await pool.wait_warm()

        async def one(i: int, submitter: str, key: str) -> None:
            job = Job(
                job_id=f"bench-{key}-{i}", submitter=submitter, kind="echo", params={"data": "ok"}, inputs={}
            )
            t0 = time.perf_counter()
            r = await pool.execute(job)
            dt = (time.perf_counter() - t0) * 1000
            if not r.ok:
                raise RuntimeError(f"echo job failed: {r.error}: {r.detail}")
            out[key].append(dt)
            out[f"{key}_job"].append(dt - float(r.metrics.get("worker_seconds", 0.0)) * 1000)

        for i in range(5):  # warm-up: the first job of a submitter takes the spare
            await one(i, "peer-a", "same")
        out["same"].clear()
        out["same_job"].clear()
        for i in range(same):
            await one(i, "peer-a", "same")
        for i in range(fresh):
            await pool.wait_warm()
            await trio.sleep(0.3)  # the replacement spare finishes starting
            await one(i, f"peer-{i}", "fresh")
        nursery.cancel_scope.cancel()
    return out


def run(quick: bool = False) -> AreaResult:
    res = AreaResult("worker")
    same = 200 if quick else 1000
    fresh = 5 if quick else 20
    with tempfile.TemporaryDirectory(prefix="pb-pool-") as d:
        m = trio.run(_measure, Path(d), same, fresh)
    t = Table(
        "Warm worker, echo job, WorkerPool.execute() wall time (ms)",
        ["path", "jobs", "p50", "p99", "mean", "overhead p50 (minus the kind's own time)", "overhead p99"],
    )
    t.add(
        "same submitter (parked worker)",
        len(m["same"]),
        pct(m["same"], 50),
        pct(m["same"], 99),
        sum(m["same"]) / len(m["same"]),
        pct(m["same_job"], 50),
        pct(m["same_job"], 99),
    )
    t.add(
        "new submitter (warm spare)",
        len(m["fresh"]),
        pct(m["fresh"], 50),
        pct(m["fresh"], 99),
        sum(m["fresh"]) / max(1, len(m["fresh"])),
        pct(m["fresh_job"], 50),
        pct(m["fresh_job"], 99),
    )
    res.tables.append(t)
    res.checks.append(budget_le("warm worker per-task overhead p50", pct(m["same_job"], 50), 2.0, "ms"))
    if not m["sandboxed"][0]:
        res.notes.append("bubblewrap was not available: measured without the sandbox")
    res.notes.append("Sandbox: bubblewrap, as the daemon runs it; one CPU slot; the daemon's default limits.")
    return res
