"""Keras on the JAX backend in a real sandboxed worker (``[offer] keras_backend = "jax"``,
docs/config.md): the same keras-train and keras-predict jobs as on TensorFlow, and weights that a
TensorFlow peer's would aggregate with.

The JAX path is an optional extra (``peerd[jax]``); ``scripts/test`` installs it, so CI covers it
on CPU. Where JAX is missing this module fails rather than skips: a JAX path that is never run
is not a tested one.
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


def test_jax_is_installed_for_the_jax_path() -> None:
    # scripts/test installs the [jax] extra; without it the tests below would prove nothing.
    assert importlib.util.find_spec("jax") is not None, "install peerd's [jax] extra: pip install -e '.[jax]'"


async def test_a_jax_worker_trains_and_predicts_like_a_tensorflow_one(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    shard, w0 = tiny_problem(tmp_path, seed=5)
    # Plain SGD, no shuffling, no dropout: a round is a fixed function of the starting weights and
    # the data, which both backends compute in float32 (only the order of sums differs).
    params: dict[str, Any] = {
        "model_config": dense_model_json(8, 16, 3),
        "optimizer": "sgd",
        "learning_rate": 0.1,
        "epochs": 2,
        "batch_size": 50,
        "shuffle": False,
        "seed": 1,
    }
    pools = {
        backend: WorkerPool(
            tmp_path / backend, warm_classes=("tf",), warm_spares=0, env={"KERAS_BACKEND": backend}
        )
        for backend in ("jax", "tensorflow")
    }
    for pool in pools.values():
        await nursery.start(pool.run)

    async def run(backend: str, kind: str, job_params: dict[str, Any], inputs: dict[str, Path]) -> JobResult:
        res = await pools[backend].execute(
            Job(uuid.uuid4().hex, "alice", kind, job_params, inputs, LIMITS, task="task-" + backend)
        )
        assert res.ok, res
        return res

    trained = {b: await run(b, "keras-train", params, {"data": shard, "weights": w0}) for b in pools}
    assert trained["jax"].metrics["jax_backend"] == 1.0
    assert trained["tensorflow"].metrics["jax_backend"] == 0.0
    assert trained["jax"].metrics["on_gpu"] == trained["tensorflow"].metrics["on_gpu"] == 0.0  # CPU slots
    start = decode_arrays(w0.read_bytes())
    jax_w = decode_arrays(trained["jax"].outputs["weights"])
    tf_w = decode_arrays(trained["tensorflow"].outputs["weights"])
    assert [a.shape for a in jax_w] == [a.shape for a in start]
    assert [a.dtype for a in jax_w] == [a.dtype for a in tf_w]
    # Both trained (16 SGD steps moved the weights), and to the same place up to float32 rounding.
    assert not np.allclose(jax_w[0], start[0])
    for a, b in zip(jax_w, tf_w, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    assert trained["jax"].metrics["loss"] == pytest.approx(trained["tensorflow"].metrics["loss"], abs=1e-4)

    # The submitter's validation (keras-predict) on JAX, on the TensorFlow peer's weights.
    tf_weights = tmp_path / "tf.bin"
    tf_weights.write_bytes(trained["tensorflow"].outputs["weights"])
    ev = {"model_config": params["model_config"]}
    preds = {b: await run(b, "keras-predict", ev, {"data": shard, "weights": tf_weights}) for b in pools}
    p_jax = decode_arrays(preds["jax"].outputs["predictions"])[0]
    p_tf = decode_arrays(preds["tensorflow"].outputs["predictions"])[0]
    assert p_jax.shape == (400, 3)
    np.testing.assert_allclose(p_jax, p_tf, rtol=0, atol=1e-5)
