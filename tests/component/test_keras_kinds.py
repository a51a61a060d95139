"""keras-train / keras-predict in real sandboxed TensorFlow workers, on scikit-learn's digits.

Kept to one test (each TensorFlow worker costs a few seconds of import on this 2-core machine):
train from given weights, check the weights decode and accuracy improves, check determinism in a
reused worker and in a fresh one, and check a config with a Lambda layer is refused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from peerd.executor import Job, JobResult, Limits, WorkerPool, probe_sandbox
from protocol.tensors import decode_arrays, encode_arrays

pytestmark = [
    pytest.mark.tf,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="TensorFlow not installed"),
    pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn not installed"),
    pytest.mark.skipif(not probe_sandbox().available, reason="bubblewrap sandbox unavailable here"),
]

LIMITS = Limits(memory_bytes=2 << 30, cpu_seconds=300, wall_seconds=600)


def mlp_config(inputs: int, hidden: int, classes: int) -> str:
    """A Keras 3 JSON model config written by hand: the daemon side never imports Keras."""
    layer = lambda cls, cfg: {"module": "keras.layers", "class_name": cls, "config": cfg}  # noqa: E731
    return json.dumps(
        {
            "module": "keras",
            "class_name": "Sequential",
            "config": {
                "name": "mlp",
                "layers": [
                    layer("InputLayer", {"batch_shape": [None, inputs], "dtype": "float32"}),
                    layer("Dense", {"units": hidden, "activation": "relu"}),
                    layer("Dropout", {"rate": 0.1}),
                    layer("Dense", {"units": classes, "activation": "softmax"}),
                ],
            },
        }
    )


def digits(tmp_path: Path) -> tuple[Path, Path]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order].astype("int64")
    train, test = tmp_path / "train.npz", tmp_path / "test.npz"
    np.savez(train, x=x[:1500], y=y[:1500])
    np.savez(test, x=x[1500:], y=y[1500:])
    return train, test


def initial_weights(tmp_path: Path) -> Path:
    rng = np.random.default_rng(42)
    arrays = [
        (rng.standard_normal((64, 32)) * 0.1).astype("float32"),
        np.zeros(32, "float32"),
        (rng.standard_normal((32, 10)) * 0.1).astype("float32"),
        np.zeros(10, "float32"),
    ]
    path = tmp_path / "w0.bin"
    path.write_bytes(encode_arrays(arrays))
    return path


async def test_keras_train_and_predict_on_digits(tmp_path: Path, nursery: trio.Nursery) -> None:
    pool = WorkerPool(tmp_path / "work", warm_classes=("tf",), reuse_idle_seconds=120)
    await nursery.start(pool.run)
    train, test = digits(tmp_path)
    w0 = initial_weights(tmp_path)
    config = mlp_config(64, 32, 10)
    train_params: dict[str, Any] = {
        "model_config": config,
        "optimizer": "adam",
        "learning_rate": 0.01,
        "loss": "sparse_categorical_crossentropy",
        "metrics": ["accuracy"],
        "epochs": 3,
        "batch_size": 32,
        "seed": 7,
    }

    async def run(submitter: str, kind: str, params: dict[str, Any], inputs: dict[str, Path]) -> JobResult:
        res = await pool.execute(Job(uuid.uuid4().hex, submitter, kind, params, inputs, LIMITS))
        assert res.ok, res
        return res

    async def predict(submitter: str, weights: Path) -> JobResult:
        return await run(
            submitter, "keras-predict", {"model_config": config}, {"weights": weights, "data": test}
        )

    before = await predict("alice", w0)
    trained = await run("alice", "keras-train", train_params, {"weights": w0, "data": train})
    weights = decode_arrays(trained.outputs["weights"])
    assert [w.shape for w in weights] == [(64, 32), (32,), (32, 10), (10,)]
    assert trained.metrics["num_samples"] == 1500
    assert 0 < trained.metrics["loss"] < 1.0
    w1 = tmp_path / "w1.bin"
    w1.write_bytes(trained.outputs["weights"])
    after = await predict("alice", w1)
    (preds,) = decode_arrays(after.outputs["predictions"])
    assert preds.shape == (297, 10)
    assert before.metrics["accuracy"] < 0.3
    assert after.metrics["accuracy"] > 0.85
    assert after.metrics["accuracy"] > before.metrics["accuracy"] + 0.5

    # Determinism (deterministic = true, a task option): same seed -> bit-identical weights, in the
    # same (reused) worker and in a fresh one.
    det_params = {**train_params, "deterministic": True}
    first = await run("alice", "keras-train", det_params, {"weights": w0, "data": train})
    digest = hashlib.sha256(first.outputs["weights"]).hexdigest()
    again = await run("alice", "keras-train", det_params, {"weights": w0, "data": train})
    assert again.metrics["worker_jobs"] > 1
    fresh = await run("bob", "keras-train", det_params, {"weights": w0, "data": train})
    assert fresh.metrics["worker_jobs"] == 1
    assert hashlib.sha256(again.outputs["weights"]).hexdigest() == digest
    assert hashlib.sha256(fresh.outputs["weights"]).hexdigest() == digest

    # No submitter code: a Lambda layer (Python bytecode in the config) is refused before Keras sees it.
    evil = json.loads(config)
    evil["config"]["layers"].insert(
        1,
        {
            "module": "keras.layers",
            "class_name": "Lambda",
            "config": {"function": {"class_name": "__lambda__"}},
        },
    )
    res = await pool.execute(
        Job(
            "evil",
            "bob",
            "keras-train",
            {**train_params, "model_config": json.dumps(evil)},
            {"data": train},
            LIMITS,
        )
    )
    assert res.error == "task_error" and "Lambda" in res.detail
    res = await pool.execute(
        Job("opt", "bob", "keras-train", {**train_params, "optimizer": "lbfgs"}, {"data": train}, LIMITS)
    )
    assert res.error == "task_error" and "optimizer" in res.detail
