"""The submitter's evaluations run off the node's training slot (issue 9 item 3): with one
advertised slot, a training job starts and finishes while the submitter's evaluation of the
previous round is still running. Real bwrap workers; the submitter's parts as in
test_submitter_driver; ordering is observed through the pool's counters, never timings."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

from peerd.executor import Job, Limits, WorkerPool, probe_sandbox
from protocol.machines import actions as act
from tests.component.test_submitter_driver import Parts

pytestmark = pytest.mark.skipif(not probe_sandbox().available, reason="bubblewrap sandbox unavailable here")


async def test_the_next_rounds_job_runs_while_the_submitters_evaluation_still_runs(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    pool = WorkerPool(tmp_path / "work", warm_classes=("light",), reuse_idle_seconds=60)
    await nursery.start(pool.run)
    (tmp_path / "node").mkdir()
    parts = await Parts.started(tmp_path / "node", nursery)
    parts.node.pool = pool
    assert pool.slots() == 1
    # A stand-in for keras-predict's validation job: it runs until the test ends it.
    evaluation = act.StartJob(
        job_id="eval-1",
        task_id="ab" * 16,
        kind="sleep",
        shard=-1,
        round=1,
        epoch=0,
        submitter=parts.node.peer_id,
        params={"seconds": 60},
        inputs={},
        purpose="evaluate",
    )
    finished: list[Any] = []

    async def evaluate() -> None:
        finished.append(await parts.submitter._evaluate(evaluation))

    async with trio.open_nursery() as n:
        n.start_soon(evaluate)
        with trio.fail_after(60):  # a safety bound
            while pool.local_jobs_started < 1:
                await trio.sleep(0.02)
        # Round 2's training job on this node's only advertised slot.
        train = Job(uuid.uuid4().hex, "someone", "echo", {"data": "round 2"}, {}, Limits())
        res = await pool.execute(train)
        assert res.ok and res.outputs["stdout"] == b"round 2"
        assert not finished and pool.local_jobs_done == 0  # the evaluation still runs
        n.cancel_scope.cancel()
    assert pool.load() == 0
