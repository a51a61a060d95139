"""``keras-train``: trains one shard of one round from a Keras JSON config — no submitter code.

params: ``model_config`` (Keras JSON config string, from ``model.to_json()``), ``optimizer``
({adam, sgd, rmsprop, adagrad}, default adam), ``learning_rate`` (default 0.001), ``loss`` (allow-list,
default sparse_categorical_crossentropy), ``metrics`` (allow-list, default ["accuracy"]), ``epochs``
(default 1), ``batch_size`` (default 32), ``seed`` (default 0), ``shuffle`` (default true),
``range`` (optional [start, stop): train on those samples of ``data`` only).
inputs: ``data`` (.npz with x, y), ``weights`` (optional: encoded arrays, the round's starting model).
outputs: ``weights`` (encoded arrays of the trained model). metrics: ``loss``, ``accuracy`` (when
computed), ``num_samples`` (the FedAvg weight), ``epochs``, ``train_seconds``.

Deterministic: ``keras.utils.set_random_seed(seed)`` after ``clear_session()``, with TensorFlow's op
determinism and one thread (set once per worker in ``_keras.get_keras``): the same job gives
bit-identical weights in a fresh or a reused worker.
"""

from __future__ import annotations

import math
import time

from peerd.executor.kinds import _keras
from peerd.executor.kinds._base import Outcome, TaskContext, TaskFailed, param
from protocol.tensors import encode_arrays


def run(ctx: TaskContext) -> Outcome:
    keras = _keras.get_keras()
    epochs = _keras.positive_int(ctx.params, "epochs", 1, 10_000)
    batch_size = _keras.positive_int(ctx.params, "batch_size", 32, 1 << 16)
    seed = param(ctx.params, "seed", int, 0)
    shuffle = param(ctx.params, "shuffle", bool, True)
    # clear_session() drops what a previous job of this (reused) worker built and resets Keras'
    # name counters; the seed is set after it so both paths draw the same initial weights.
    keras.backend.clear_session()
    keras.utils.set_random_seed(int(seed) % (1 << 32))
    x, y = _keras.load_data(ctx, need_y=True)
    model = _keras.build_model(ctx)
    model.compile(**_keras.compile_args(ctx.params, default_metrics=["accuracy"]))
    t0 = time.perf_counter()
    try:
        history = model.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=shuffle, verbose=0)
    except (ValueError, TypeError) as e:  # shape/dtype mismatch between model, loss and data
        raise TaskFailed("task_error", f"training failed: {type(e).__name__}: {e}") from None
    train_seconds = time.perf_counter() - t0
    metrics = {"num_samples": float(len(x)), "epochs": float(epochs), "train_seconds": train_seconds}
    for key, values in history.history.items():
        if values:
            metrics[key] = float(values[-1])
    if "accuracy" not in metrics:
        for alias in ("sparse_categorical_accuracy", "categorical_accuracy", "binary_accuracy"):
            if alias in metrics:
                metrics["accuracy"] = metrics[alias]
                break
    if not math.isfinite(metrics.get("loss", 0.0)):
        raise TaskFailed("task_error", "training diverged (loss is not finite)", metrics=metrics)
    weights = encode_arrays(model.get_weights())
    return Outcome(outputs={"weights": weights}, metrics=metrics)
