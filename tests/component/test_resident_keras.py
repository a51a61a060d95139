"""Resident models in a real sandboxed TensorFlow worker: a task's rounds reuse the decoded shard and
the compiled model, each round starts from a fresh optimizer, and the task's end frees them
(docs/tasks.md "keras-train across rounds").

One test (a TensorFlow worker costs seconds of import on this 2-core machine), on a tiny
synthetic problem: no Dropout and no shuffling, so a round's result depends only on its starting
weights, its data and its optimizer state, and the resident path can be compared with a fresh
worker's.
"""

from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from peerd.executor import Job, JobResult, Limits, WorkerPool, probe_sandbox
from protocol.tensors import decode_arrays
from tests.helpers_training import dense_model_json, tiny_problem

pytestmark = [
    pytest.mark.tf,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="TensorFlow not installed"),
    pytest.mark.skipif(not probe_sandbox().available, reason="bubblewrap sandbox unavailable here"),
]

LIMITS = Limits(memory_bytes=2 << 30, cpu_seconds=300, wall_seconds=600)


async def test_rounds_reuse_shard_and_model_with_a_fresh_optimizer(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    shard, w0 = tiny_problem(tmp_path, seed=3)
    params: dict[str, Any] = {
        "model_config": dense_model_json(8, 16, 3),
        "optimizer": "adam",
        "learning_rate": 0.05,
        "epochs": 2,
        "batch_size": 50,
        "shuffle": False,
        "seed": 1,
    }
    pool = WorkerPool(tmp_path / "work", warm_classes=("tf",), reuse_idle_seconds=300)
    await nursery.start(pool.run)

    async def train(submitter: str, weights: Path, task: str) -> JobResult:
        res = await pool.execute(
            Job(
                uuid.uuid4().hex,
                submitter,
                "keras-train",
                params,
                {"data": shard, "weights": weights},
                LIMITS,
                task=task,
            )
        )
        assert res.ok, res
        return res

    def saved(res: JobResult, name: str) -> Path:
        path = tmp_path / name
        path.write_bytes(res.outputs["weights"])
        return path

    r1 = await train("alice", w0, "task-a")
    assert (r1.metrics["worker_jobs"], r1.metrics["resident_data"], r1.metrics["resident_model"]) == (1, 0, 0)
    w1 = saved(r1, "w1.bin")
    r2 = await train("alice", w1, "task-a")
    # Round 2 in the same worker: the shard is not decoded again, the model not rebuilt.
    assert (r2.metrics["worker_jobs"], r2.metrics["resident_data"], r2.metrics["resident_model"]) == (2, 1, 1)

    # Fresh optimizer: round 2 on the resident model gives what a fresh worker gives from the same
    # weights (a carried-over Adam state, 16 steps in, would move the weights elsewhere).
    fresh = await train("bob", w1, "task-b")
    assert (fresh.metrics["worker_jobs"], fresh.metrics["resident_model"]) == (1, 0)
    for a, b in zip(
        decode_arrays(r2.outputs["weights"]), decode_arrays(fresh.outputs["weights"]), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert not np.allclose(decode_arrays(r2.outputs["weights"])[0], decode_arrays(w1.read_bytes())[0])

    # bob's job took the slot's worker (workers never cross submitters): alice starts afresh...
    a1 = await train("alice", w0, "task-c")
    assert (a1.metrics["worker_jobs"], a1.metrics["resident_model"]) == (1, 0)
    a2 = await train("alice", saved(a1, "a1.bin"), "task-c")
    assert a2.metrics["resident_model"] == 1
    # ...and once task-c ends, its next job (a rerun, say) finds nothing resident in the same worker.
    pool.forget_task("task-c")
    a3 = await train("alice", saved(a2, "a2.bin"), "task-c")
    assert (a3.metrics["worker_jobs"], a3.metrics["resident_data"], a3.metrics["resident_model"]) == (3, 0, 0)

    # keras-predict (the submitter's per-round validation) keeps its model too, and each job's
    # weights really go into it: two rounds' models give two different predictions.
    ev = {"model_config": params["model_config"]}
    p1 = await pool.execute(Job("p1", "alice", "keras-predict", ev, {"data": shard, "weights": w1}, LIMITS))
    p2 = await pool.execute(
        Job("p2", "alice", "keras-predict", ev, {"data": shard, "weights": saved(a3, "a3.bin")}, LIMITS)
    )
    assert p1.ok and p2.ok, (p1, p2)
    assert (p1.metrics["resident_model"], p2.metrics["resident_model"], p2.metrics["resident_data"]) == (
        0,
        1,
        1,
    )
    assert not np.allclose(
        decode_arrays(p1.outputs["predictions"])[0], decode_arrays(p2.outputs["predictions"])[0]
    )

    # deterministic = true: a model built anew, bit-identical in the reused worker and a fresh one.
    det = {**params, "deterministic": True}
    d1 = await pool.execute(Job("d1", "alice", "keras-train", det, {"data": shard, "weights": w1}, LIMITS))
    d2 = await pool.execute(Job("d2", "carol", "keras-train", det, {"data": shard, "weights": w1}, LIMITS))
    assert d1.ok and d2.ok, (d1, d2)
    assert (d1.metrics["worker_jobs"], d1.metrics["resident_model"], d2.metrics["worker_jobs"]) == (6, 0, 1)
    assert d1.outputs["weights"] == d2.outputs["weights"]
