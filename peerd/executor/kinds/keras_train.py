"""``keras-train``: trains one shard of one round from a Keras JSON config — no submitter code.

params: ``model_config`` (Keras JSON config string, from ``model.to_json()``), ``optimizer``
({adam, sgd, rmsprop, adagrad}, default adam), ``learning_rate`` (default 0.001), ``loss`` (allow-list,
default sparse_categorical_crossentropy), ``metrics`` (allow-list, default ["accuracy"]), ``epochs``
(default 1), ``batch_size`` (default 32), ``seed`` (default 0), ``shuffle`` (default true),
``range`` (optional [start, stop): train on those samples of ``data`` only), ``deterministic``
(default false).
inputs: ``data`` (.npz with x, y), ``weights`` (optional: encoded arrays, the round's starting model).
outputs: ``weights`` (encoded arrays of the trained model). metrics: ``loss``, ``accuracy`` (when
computed), ``num_samples`` (the FedAvg weight), ``epochs``, ``train_seconds`` (the fit),
``train_cpu_seconds`` (its CPU time), ``load_seconds``, ``build_seconds``, ``encode_seconds``,
``resident_data`` / ``resident_model`` (1 when this worker reused the decoded shard / the
compiled model), ``jax_backend`` (1 when Keras ran on JAX, the contributor's
``[offer] keras_backend``; 0 on TensorFlow), ``on_gpu`` (1 when it computed on a GPU).

Resident (the default, docs/tasks.md): a warm worker keeps the decoded shard and the compiled
model between rounds (peerd.executor.kinds._resident); each round loads the job's weights into
it and resets its optimizer to a fresh one's state, so the train step is not traced again.

``deterministic = true``: TensorFlow's op determinism for the job, ``clear_session()`` and
``keras.utils.set_random_seed(seed)`` and a model built anew, with one thread (every worker):
the same job gives bit-identical weights in a fresh or a reused worker. Nothing in a round
needs that (committees recompute the aggregate from the committed weights), so it is opt-in.
"""

from __future__ import annotations

import math
import time

from peerd.executor.kinds import _keras
from peerd.executor.kinds._base import Outcome, TaskContext, TaskFailed, param
from peerd.executor.kinds._resident import CACHE
from protocol.tensors import encode_arrays


def run(ctx: TaskContext) -> Outcome:
    keras = _keras.get_keras()
    epochs = _keras.positive_int(ctx.params, "epochs", 1, 10_000)
    batch_size = _keras.positive_int(ctx.params, "batch_size", 32, 1 << 16)
    seed = param(ctx.params, "seed", int, 0)
    shuffle = param(ctx.params, "shuffle", bool, True)
    deterministic = param(ctx.params, "deterministic", bool, False)
    cache = CACHE
    _keras.set_determinism(deterministic)
    if deterministic:
        # clear_session() drops what a previous job of this (reused) worker built and resets
        # Keras' name counters; the seed is set after it, and the model is always built anew,
        # so a fresh and a reused worker give bit-identical weights.
        keras.backend.clear_session()
    keras.utils.set_random_seed(int(seed) % (1 << 32))
    t_load = time.perf_counter()
    x, y, data_hit = _keras.data_for(ctx, need_y=True, cache=cache)
    t_build = time.perf_counter()
    model, model_key, model_hit = _keras.train_model(
        ctx, default_metrics=["accuracy"], cache=None if deterministic else cache
    )
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        history = model.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=shuffle, verbose=0)
    except (ValueError, TypeError) as e:  # shape/dtype mismatch between model, loss and data
        if model_key is not None:
            cache.discard(model_key)
        raise TaskFailed("task_error", f"training failed: {type(e).__name__}: {e}") from None
    train_seconds = time.perf_counter() - t0
    train_cpu = time.process_time() - c0
    metrics = {
        "num_samples": float(len(x)),
        "epochs": float(epochs),
        "train_seconds": train_seconds,
        # CPU time of the fit: with one thread per slot, what the fit costs whatever the load.
        "train_cpu_seconds": train_cpu,
        "load_seconds": t_build - t_load,
        "build_seconds": t0 - t_build,
        "resident_data": float(data_hit),
        "resident_model": float(model_hit),
        # Which Keras backend trained it ([offer] keras_backend): peers of both train one round.
        "jax_backend": float(keras.backend.backend() == "jax"),
        "on_gpu": float(_keras.on_gpu()),
    }
    for key, values in history.history.items():
        if values:
            metrics[key] = float(values[-1])
    if "accuracy" not in metrics:
        for alias in ("sparse_categorical_accuracy", "categorical_accuracy", "binary_accuracy"):
            if alias in metrics:
                metrics["accuracy"] = metrics[alias]
                break
    if not math.isfinite(metrics.get("loss", 0.0)):
        if model_key is not None:
            cache.discard(model_key)
        raise TaskFailed("task_error", "training diverged (loss is not finite)", metrics=metrics)
    if model_key is not None and not model_hit:
        _keras.remember(cache, model_key, model, _keras._model_bytes(model), ctx)
    t_enc = time.perf_counter()
    weights = encode_arrays(model.get_weights())
    metrics["encode_seconds"] = time.perf_counter() - t_enc
    return Outcome(outputs={"weights": weights}, metrics=metrics)
