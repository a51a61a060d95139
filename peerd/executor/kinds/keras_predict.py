"""``keras-predict``: runs a model (config + weights) over ``data`` — no submitter code.

params: ``model_config``, ``batch_size`` (default 256), and when ``data`` has ``y``: ``loss``
(allow-list, default sparse_categorical_crossentropy) and ``metrics`` (default ["accuracy"]).
inputs: ``weights`` (required), ``data`` (.npz with x and optionally y).
outputs: ``predictions`` (encoded arrays: one array of model outputs). metrics: ``num_samples``,
and ``loss``/``accuracy`` when y is given; ``resident_data`` / ``resident_model`` as keras-train's.
"""

from __future__ import annotations

from peerd.executor.kinds import _keras
from peerd.executor.kinds._base import Outcome, TaskContext, TaskFailed, param
from peerd.executor.kinds._resident import CACHE, content_key
from protocol.tensors import encode_arrays


def run(ctx: TaskContext) -> Outcome:
    _keras.get_keras()
    if "weights" not in ctx.inputs:
        raise TaskFailed("task_error", "input 'weights' is required")
    batch_size = _keras.positive_int(ctx.params, "batch_size", 256, 1 << 16)
    _keras.set_determinism(False)
    x, y, data_hit = _keras.data_for(ctx, need_y=False, cache=CACHE)
    # Resident (as keras-train's): the submitter evaluates every round's model on the same data
    # with the same config, so the built (and, with y, compiled) model is kept and only the
    # weights change. Keyed by what shapes it; a compiled model has no state between jobs but
    # its metrics, which evaluate() resets.
    compiled = _keras.compile_key_parts(ctx.params, default_metrics=["accuracy"]) if y is not None else None
    raw = param(ctx.params, "model_config", (str, dict))
    model_key = content_key("predict-model", config=raw, compiled=compiled)
    entry = CACHE.get(model_key, ctx.task)
    if entry is not None:
        model = entry.value
        _keras.load_weights(ctx, model)
    else:
        model = _keras.build_model(ctx)
        if y is not None:
            model.compile(**_keras.compile_args(ctx.params, default_metrics=["accuracy"]))
    metrics: dict[str, float] = {
        "num_samples": float(len(x)),
        "resident_data": float(data_hit),
        "resident_model": float(entry is not None),
    }
    try:
        predictions = model.predict(x, batch_size=batch_size, verbose=0)
        if y is not None:
            scores = model.evaluate(x, y, batch_size=batch_size, verbose=0, return_dict=True)
            for key, value in scores.items():
                metrics[key] = float(value)
            for alias in ("sparse_categorical_accuracy", "categorical_accuracy", "binary_accuracy"):
                if "accuracy" not in metrics and alias in metrics:
                    metrics["accuracy"] = metrics[alias]
    except (ValueError, TypeError) as e:
        CACHE.discard(model_key)
        raise TaskFailed("task_error", f"prediction failed: {type(e).__name__}: {e}") from None
    if entry is None:
        _keras.remember(CACHE, model_key, model, _keras._model_bytes(model), ctx)
    return Outcome(outputs={"predictions": encode_arrays([predictions])}, metrics=metrics)
